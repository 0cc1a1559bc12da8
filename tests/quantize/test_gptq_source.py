"""A pre-quantized GPTQ checkpoint (AutoGPTQ layout: qweight, qzeros, scales, g_idx) converts to W4A16_GPTQ with its
own integers, scales and zeros, without rounding again; the engine computes its dequantized weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.errors import PipelineError
from pipeline.quantize.mixed_gemm import unpreprocess_weights_for_mixed_gemm
from tests.quantize.conftest import GROUP, convert_quantized
from tests.quantize.test_engines import build, generate

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def pack_words(values: np.ndarray, axis: int, bits: int = 4) -> np.ndarray:
    """Unsigned values -> int32 words, 32 / bits per word along `axis`, lowest bits first (AutoGPTQ)."""
    per = 32 // bits
    v = np.moveaxis(values.astype(np.uint64), axis, 0)
    v = v.reshape(v.shape[0] // per, per, *v.shape[1:])
    words = sum(v[:, j] << np.uint64(bits * j) for j in range(per))
    return np.ascontiguousarray(np.moveaxis(words.astype(np.uint32).view(np.int32), 0, axis))


def gptq_checkpoint(src, dst, zero_offset=1, g_idx=None, bits=4):
    """Round-to-nearest asymmetric integers in groups, stored as AutoGPTQ does (v1 format: zeros minus one)."""
    umax = (1 << bits) - 1
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    truth = {}
    for name in list(weights):
        module = name[: -len(".weight")]
        if not name.endswith(".weight") or not module.endswith(LINEARS):
            continue
        w = weights.pop(name).float()  # (out, in)
        g = w.reshape(w.shape[0], -1, GROUP)
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = ((hi - lo) / umax).half().float()
        zero = torch.round(-lo / scale).clamp(0, umax)
        q = torch.clamp(torch.round(g / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, umax).reshape(w.shape)
        truth[module] = (q, scale, zero)
        weights[f"{module}.qweight"] = torch.from_numpy(pack_words(q.t().numpy().astype(np.int64), 0, bits))
        weights[f"{module}.qzeros"] = torch.from_numpy(
            pack_words((zero.t() - zero_offset).numpy().astype(np.int64), 1, bits))
        weights[f"{module}.scales"] = scale.t().contiguous().half()
        weights[f"{module}.g_idx"] = (torch.arange(w.shape[1]) // GROUP).int() if g_idx is None else g_idx(w.shape[1])
    save_file(weights, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": GROUP, "desc_act": False,
                                  "sym": False, "checkpoint_format": "gptq" if zero_offset else "gptq_v2"}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst, truth


@pytest.mark.parametrize("fmt_offset", [1, 0], ids=["gptq_v1", "gptq_v2"])
def test_source_integers_are_kept(quant_model, tmp_path, fmt_offset):
    model, truth = gptq_checkpoint(quant_model, tmp_path / "gptq", fmt_offset)
    convert_quantized(model, None, tmp_path / "ckpt", "W4A16_GPTQ")
    with safe_open(str(tmp_path / "ckpt" / "rank0.safetensors"), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    q, scale, zero = truth["model.layers.1.mlp.down_proj"]
    m = "transformer.layers.1.mlp.proj"
    assert torch.equal(unpreprocess_weights_for_mixed_gemm(t[f"{m}.weight"], 4, 80).t().float(), q - 8)
    assert torch.equal(t[f"{m}.weights_scaling_factor"].t(), scale)
    assert torch.allclose(t[f"{m}.zero"].t(), (8 - zero) * scale)
    # fused qkv: q, k and v rows in order
    qq, kq, vq = (truth[f"model.layers.0.self_attn.{p}_proj"][0] for p in "qkv")
    got = unpreprocess_weights_for_mixed_gemm(t["transformer.layers.0.attention.qkv.weight"], 4, 80).t().float()
    assert torch.equal(got, torch.cat([qq, kq, vq]) - 8)


def test_engine_computes_the_dequantized_weights(quant_model, tmp_path):
    """The GPTQ engine equals the float engine of the same source read as dequantized floats."""
    model, _ = gptq_checkpoint(quant_model, tmp_path / "gptq")
    convert_quantized(model, None, tmp_path / "q" / "ckpt", "W4A16_GPTQ")
    convert_quantized(model, None, tmp_path / "f" / "ckpt", None)
    got = generate(build(tmp_path / "q" / "ckpt", tmp_path / "q" / "engine"))
    want = generate(build(tmp_path / "f" / "ckpt", tmp_path / "f" / "engine"))
    assert (got["context_logits"] - want["context_logits"]).abs().max().item() < 1e-4
    assert torch.equal(got["output_ids"], want["output_ids"])


def test_tp2_splits_the_source_integers(quant_model, tmp_path):
    model, truth = gptq_checkpoint(quant_model, tmp_path / "gptq")
    convert_quantized(model, None, tmp_path / "ckpt", "W4A16_GPTQ", tp=2)
    q = truth["model.layers.0.mlp.down_proj"][0] - 8  # row-parallel: input columns split
    for r in range(2):
        with safe_open(str(tmp_path / "ckpt" / f"rank{r}.safetensors"), framework="pt") as f:
            got = unpreprocess_weights_for_mixed_gemm(f.get_tensor("transformer.layers.0.mlp.proj.weight"), 4, 80)
        assert torch.equal(got.t().float(), q[:, r * 128:(r + 1) * 128])


def test_group_size_mismatch_is_refused(quant_model, tmp_path):
    model, _ = gptq_checkpoint(quant_model, tmp_path / "gptq")
    with pytest.raises(PipelineError, match="set quantization.group_size=64"):
        convert_quantized(model, None, tmp_path / "ckpt", "W4A16_GPTQ", group_size=128)


def test_act_order_is_refused(quant_model, tmp_path):
    model, _ = gptq_checkpoint(quant_model, tmp_path / "gptq",
                               g_idx=lambda n: (torch.randperm(n, generator=torch.Generator().manual_seed(0)) // GROUP).int())
    with pytest.raises(PipelineError, match="act-order"):
        convert_quantized(model, None, tmp_path / "ckpt", "W4A16_GPTQ")


def test_eight_bit_source_converts_to_w8a16_gptq(quant_model, tmp_path):
    model, truth = gptq_checkpoint(quant_model, tmp_path / "gptq", bits=8)
    convert_quantized(model, None, tmp_path / "q" / "ckpt", "W8A16_GPTQ")
    with safe_open(str(tmp_path / "q" / "ckpt" / "rank0.safetensors"), framework="pt") as f:
        weight = f.get_tensor("transformer.layers.1.mlp.proj.weight")
    assert weight.dtype == torch.float16 and weight.shape == (256, 128 // 2)  # (in, out / 2) container
    q = truth["model.layers.1.mlp.down_proj"][0]
    assert torch.equal(unpreprocess_weights_for_mixed_gemm(weight, 8, 80).t().float(), q - 128)
    convert_quantized(model, None, tmp_path / "f" / "ckpt", None)
    got = generate(build(tmp_path / "q" / "ckpt", tmp_path / "q" / "engine"))
    want = generate(build(tmp_path / "f" / "ckpt", tmp_path / "f" / "engine"))
    assert (got["context_logits"] - want["context_logits"]).abs().max().item() < 1e-4
