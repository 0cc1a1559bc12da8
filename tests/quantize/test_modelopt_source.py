"""ModelOpt's exports as sources, compared with ModelOpt itself.

With `nvidia-modelopt` installed (the `modelopt` extra), a tiny Llama is fake-quantized on CPU and exported twice by
ModelOpt (`tests/quantize/modelopt_export.py`): the unified HF checkpoint, which we convert (`model.source=modelopt`),
and the legacy TensorRT-LLM checkpoint, which is the reference: names, shapes, config quantization, integers and
scales, or (where ModelOpt's two exporters smooth differently) the dequantized effective weights. The legacy export
also converts as `model.source=trtllm` to the same tp2 checkpoint as the unified one. Hand-built samples cover the
refusals without ModelOpt.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.convert.converter import convert
from pipeline.convert.registry import MappingArgs
from pipeline.convert.sources import open_source
from pipeline.errors import PipelineError
from pipeline.quantize.numerics import FP8_MAX
from tests.quantize.conftest import quantization

REPO = Path(__file__).resolve().parents[2]
ALGOS = ["fp8_kv", "int4_awq", "w4a8_awq", "int8_sq"]
needs_modelopt = pytest.mark.skipif(importlib.util.find_spec("modelopt") is None,
                                    reason="needs nvidia-modelopt: pip install 'trtllm-pipeline[modelopt]'")


@pytest.fixture(scope="module")
def exports(quant_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("modelopt")
    subprocess.run([sys.executable, "-m", "tests.quantize.modelopt_export", str(quant_model), str(out), *ALGOS],
                   cwd=REPO, check=True, capture_output=True, timeout=1200)
    for algo in ALGOS:
        for error in (out / algo).glob("*.error"):
            pytest.fail(f"ModelOpt's {error.stem} export of {algo} failed on CPU:\n{error.read_text()}")
    return out


def run(kind, path, out, dtype="float32", tp=1, q=None):
    src = open_source(kind, path)
    try:
        return convert(src, out, dtype, MappingArgs(tp), progress=False, quantization=q)
    finally:
        src.close()


def _effective(t: dict[str, torch.Tensor], module: str, norm: str | None, group: int) -> torch.Tensor:
    """What a quantized linear computes with, as one float matrix: dequantized weight x prequant x preceding norm."""
    q = t[f"{module}.weight"]
    if q.dtype == torch.float8_e4m3fn:
        w = q.float() * t[f"{module}.weights_scaling_factor"].float()
    else:
        from pipeline.quantize.numerics import unpack_int4_rows

        vals = unpack_int4_rows(q).float() if f"{module}.weights_scaling_factor_2" in t or q.shape[0] * 2 == \
            t[f"{module}.weights_scaling_factor"].shape[0] else q.float()
        s = t[f"{module}.weights_scaling_factor"].float()
        w = vals * (s.repeat_interleave(group, dim=1) if s.dim() == 2 else s[:, None])
    pre = t.get(f"{module}.prequant_scaling_factor")
    if pre is not None:
        w = w * pre.float()[None, :]
    if norm is not None:
        w = w * t[norm].float()[None, :]
    return w


LINEARS = {"attention.qkv": "input_layernorm.weight", "attention.dense": None, "mlp.fc": "post_layernorm.weight",
           "mlp.gate": "post_layernorm.weight", "mlp.proj": None}


@needs_modelopt
@pytest.mark.parametrize("algo", ALGOS)
def test_unified_export_matches_modelopts_trtllm_export(exports, tmp_path, algo):
    legacy_dir = exports / algo / "legacy"
    run("modelopt", exports / algo / "unified", tmp_path)
    ours, legacy = load_file(tmp_path / "rank0.safetensors"), load_file(legacy_dir / "rank0.safetensors")
    ours_cfg, legacy_cfg = (json.loads((d / "config.json").read_text()) for d in (tmp_path, legacy_dir))
    # ModelOpt's legacy export adds separate K and V scales for TensorRT-LLM releases before 0.17 (their max is
    # kv_cache_scaling_factor, which both carry)
    assert set(ours) == {n for n in legacy if not n.endswith(("k_cache_scaling_factor", "v_cache_scaling_factor"))
                         or n.endswith("kv_cache_scaling_factor")}
    for name in ours:
        assert ours[name].shape == legacy[name].shape, name
        if not ours[name].is_floating_point() or ours[name].dtype == torch.float8_e4m3fn:
            assert ours[name].dtype == legacy[name].dtype, name
    for key in ("quant_algo", "kv_cache_quant_algo", "group_size", "has_zero_point", "pre_quant_scale"):
        assert ours_cfg["quantization"].get(key) == legacy_cfg["quantization"].get(key), key
    assert "lm_head" in legacy_cfg["quantization"]["exclude_modules"]
    assert any(p.endswith("lm_head") for p in ours_cfg["quantization"]["exclude_modules"])
    group = ours_cfg["quantization"].get("group_size") or 0
    for layer in range(ours_cfg["num_hidden_layers"]):
        pre = f"transformer.layers.{layer}."
        for module, norm in LINEARS.items():
            a = _effective(ours, pre + module, norm and pre + norm, group)
            b = _effective(legacy, pre + module, norm and pre + norm, group)
            # legacy: float16 export; AWQ's two exporters resmooth gate/up differently (one int4 step apart)
            tol = 0.02 if algo in ("fp8_kv", "int8_sq") else 0.15
            assert float((a - b).norm() / b.norm()) < tol, (pre + module, float((a - b).norm() / b.norm()))
        if algo == "fp8_kv":  # the legacy exporter clamps FP8 KV scales to >= 1.0; the unified one does not
            kv = ours[pre + "attention.kv_cache_scaling_factor"]
            assert legacy[pre + "attention.kv_cache_scaling_factor"].item() == 1.0 and 0 < kv.item() < 1.0


@needs_modelopt
@pytest.mark.parametrize("algo", ["int8_sq", "fp8_kv"])
def test_legacy_export_converts_like_unified(exports, tmp_path, algo):
    """ModelOpt's legacy TensorRT-LLM export (producer: modelopt) as a trtllm source, resharded to tp2, equals
    the unified export converted to tp2 (ModelOpt wrote the legacy one in float16: compared after that cast)."""
    run("modelopt", exports / algo / "unified", tmp_path / "uni", tp=2)
    run("trtllm", exports / algo / "legacy", tmp_path / "leg", dtype="float16", tp=2)
    for rank in (0, 1):
        a, b = (load_file(tmp_path / d / f"rank{rank}.safetensors") for d in ("uni", "leg"))
        assert set(a) == set(b)
        for name in a:
            if name.endswith("kv_cache_scaling_factor"):
                continue  # clamped to 1.0 by the legacy exporter (above)
            x, y = a[name], b[name]
            if x.element_size() == 1:
                assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name
            else:
                assert torch.equal(x.to(y.dtype), y), name


@needs_modelopt
def test_quantized_export_refusals(exports, tmp_path):
    with pytest.raises(PipelineError, match="would re-quantize"):
        run("modelopt", exports / "int4_awq" / "unified", tmp_path / "x", q=quantization("FP8"))
    with pytest.raises(PipelineError, match="would be rounded in torch.float16"):
        run("modelopt", exports / "int4_awq" / "unified", tmp_path / "y", dtype="float16")
    with pytest.raises(PipelineError, match="model.source=modelopt"):
        open_source("hf", exports / "int4_awq" / "unified")


# -- hand-built samples (no ModelOpt needed) --------------------------------------------------------------------------
def hand_built_fp8(model_dir: Path, out: Path, algo: str = "FP8") -> Path:
    """A unified FP8 export by ModelOpt's formulas: per-tensor weight scale amax / 448, a static input scale."""
    out.mkdir()
    tensors = load_file(model_dir / "model.safetensors")
    stored = {}
    for name, t in tensors.items():
        if name.endswith("_proj.weight"):
            module = name[: -len(".weight")]
            scale = t.abs().max().float() / FP8_MAX
            stored[name] = (t.float() / scale).to(torch.float8_e4m3fn)
            stored[f"{module}.weight_scale"] = scale.reshape(())
            stored[f"{module}.input_scale"] = torch.tensor(0.01)
        else:
            stored[name] = t
    save_file(stored, out / "model.safetensors")
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": algo, "ignore": ["lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt", "version": "0.47.0"},
                                                          "quantization": {"quant_algo": algo,
                                                                           "kv_cache_quant_algo": None,
                                                                           "exclude_modules": ["lm_head"]}}))
    return out


def test_hand_built_fp8_keeps_integers(quant_model, tmp_path):
    src = hand_built_fp8(quant_model, tmp_path / "fp8")
    run("modelopt", src, tmp_path / "ckpt", tp=2)
    stored = load_file(src / "model.safetensors")
    rank0 = load_file(tmp_path / "ckpt" / "rank0.safetensors")
    q, k = stored["model.layers.0.self_attn.q_proj.weight"], stored["model.layers.0.self_attn.k_proj.weight"]
    sq, sk = (stored[f"model.layers.0.self_attn.{p}_proj.weight_scale"] for p in "qk")
    common = torch.maximum(sq, sk)
    qkv = rank0["transformer.layers.0.attention.qkv.weight"]
    assert rank0["transformer.layers.0.attention.qkv.weights_scaling_factor"].item() == common.item()
    half = q.shape[0] // 2
    if sq == common:  # the part with the largest scale keeps its bytes
        assert torch.equal(qkv[:half].view(torch.uint8), q[:half].view(torch.uint8))
    dense = rank0["transformer.layers.0.attention.dense.weight"]
    o = stored["model.layers.0.self_attn.o_proj.weight"]
    assert torch.equal(dense.view(torch.uint8), o[:, : o.shape[1] // 2].view(torch.uint8))
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == "FP8" and "*lm_head" in cfg["quantization"]["exclude_modules"]


@pytest.mark.parametrize("algo,message", [("NVFP4", "NVFP4 .* no cpu-engine kernel"),
                                          ("FP8_BLOCK_SCALES", "block scales are not expressible"),
                                          ("INT3_MAGIC", "'INT3_MAGIC' is not one this converter knows")])
def test_algorithms_refused_by_name(quant_model, tmp_path, algo, message):
    src = hand_built_fp8(quant_model, tmp_path / "q", algo)
    with pytest.raises(PipelineError, match=message):
        open_source("modelopt", src)


def test_missing_scale_is_one_error(quant_model, tmp_path):
    src = hand_built_fp8(quant_model, tmp_path / "q")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.input_scale"]
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(PipelineError, match=r"model.layers.1.mlp.up_proj.input_scale is missing"):
        open_source("modelopt", src)
