"""Quantized checkpoints hold exactly the tensors the TensorRT-LLM checkpoint reference lists per algorithm: names,
dtypes, per-rank shapes and splits, scale formulas; impossible combinations are refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from pipeline.checkpoint.validate import validate_checkpoint
from pipeline.errors import PipelineError
from pipeline.quantize.mixed_gemm import unpreprocess_weights_for_mixed_gemm
from pipeline.quantize.stats import StatsReader
from tests.quantize.conftest import GROUP, convert_quantized

H, QKV, INTER = 128, 256, 256  # hidden, fused qkv rows (4 heads + 2 + 2 KV heads of 32), intermediate
F32, I8, F16, F8 = "F32", "I8", "F16", "F8_E4M3"
# (module, out, in, split): column-parallel layers split out, row-parallel ones split in
LINEARS = [("attention.qkv", QKV, H, "column"), ("attention.dense", H, H, "row"), ("mlp.fc", INTER, H, "column"),
           ("mlp.gate", INTER, H, "column"), ("mlp.proj", H, INTER, "row")]


def expected(algo: str, out: int, inp: int, split: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """suffix -> (shape, safetensors dtype) per the reference's section 4, for one rank's (out, inp)."""
    g = GROUP
    per_row = (out,)  # SmoothQuant per-channel scales are per output row, full on row-parallel ranks
    if algo in ("W8A16", "W4A16"):
        return {"weight": ((out, inp), F32)}
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        e = {"weight": ((out // 2, inp), I8), "weights_scaling_factor": ((out, inp // g), F32),
             "prequant_scaling_factor": ((inp,), F32)}
        if algo == "W4A8_AWQ":
            e.update(weights_scaling_factor_2=((1,), F32), activation_scaling_factor=((1,), F32))
        return e
    if algo == "W4A16_GPTQ":
        return {"weight": ((inp, out // 4), F16), "weights_scaling_factor": ((inp // g, out), F32),
                "zero": ((inp // g, out), F32)}
    if algo == "W8A8_SQ_PER_CHANNEL":
        return {"weight": ((out, inp), I8), "weights_scaling_factor": (per_row, F32),
                "activation_scaling_factor": ((1,), F32), "prequant_scaling_factor": ((inp,), F32)}
    if algo == "FP8":
        return {"weight": ((out, inp), F8), "weights_scaling_factor": ((1,), F32),
                "activation_scaling_factor": ((1,), F32)}
    raise AssertionError(algo)


ALGOS = ["W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL", "FP8"]


def tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def dtype_name(path, name):
    with safe_open(str(path), framework="pt") as f:
        return f.get_slice(name).get_dtype()


@pytest.fixture(scope="module")
def checkpoints(quant_model, quant_stats, tmp_path_factory):
    out = {}
    for algo in ALGOS:
        for tp in (1, 2):
            d = tmp_path_factory.mktemp(f"{algo}_tp{tp}")
            convert_quantized(quant_model, quant_stats, d, algo, tp=tp)
            out[algo, tp] = d
    return out


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("tp", [1, 2])
def test_names_shapes_dtypes_per_rank(checkpoints, algo, tp):
    d = checkpoints[algo, tp]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == algo
    assert validate_checkpoint(d) == []
    for rank in range(tp):
        path = d / f"rank{rank}.safetensors"
        names = set(tensors(path))
        for module, out, inp, split in LINEARS:
            local = (out // tp, inp) if split == "column" else (out, inp // tp)
            for suffix, (shape, dt) in expected(algo, *local, split).items():
                name = f"transformer.layers.1.{module}.{suffix}"
                assert name in names, name
                with safe_open(str(path), framework="pt") as f:
                    assert tuple(f.get_slice(name).get_shape()) == shape, (name, rank)
                assert dtype_name(path, name) == dt, name
        # left unquantized by default: embedding, lm_head, norms
        assert dtype_name(path, "lm_head.weight") == F32
        assert not any(n.startswith("lm_head.") and n != "lm_head.weight" for n in names)


@pytest.mark.parametrize("algo", ["W4A8_AWQ", "FP8", "W8A8_SQ_PER_CHANNEL"])
def test_per_tensor_scales_identical_on_all_ranks(checkpoints, algo):
    r0, r1 = (tensors(checkpoints[algo, 2] / f"rank{r}.safetensors") for r in (0, 1))
    one = tensors(checkpoints[algo, 1] / "rank0.safetensors")
    scalars = [n for n, t in r0.items() if n.endswith("_factor") and t.shape == (1,)]
    assert scalars
    for n in scalars:
        assert torch.equal(r0[n], r1[n]) and torch.equal(r0[n], one[n]), n


def _unpack_rows(packed):
    b = packed.view(torch.uint8).to(torch.int16)
    lo, hi = b & 15, b >> 4
    lo, hi = torch.where(lo > 7, lo - 16, lo), torch.where(hi > 7, hi - 16, hi)
    return torch.stack([lo, hi], 1).reshape(-1, packed.shape[1])


def test_awq_int4_row_pairs_and_group_splits(checkpoints):
    """Column-parallel: each rank holds whole row pairs of the tp1 weight; row-parallel: whole groups of input."""
    one = tensors(checkpoints["W4A16_AWQ", 1] / "rank0.safetensors")
    ranks = [tensors(checkpoints["W4A16_AWQ", 2] / f"rank{r}.safetensors") for r in (0, 1)]
    fc = "transformer.layers.0.mlp.fc"
    assert torch.equal(torch.cat([_unpack_rows(r[f"{fc}.weight"]) for r in ranks]), _unpack_rows(one[f"{fc}.weight"]))
    assert torch.equal(ranks[0][f"{fc}.prequant_scaling_factor"], one[f"{fc}.prequant_scaling_factor"])
    proj = "transformer.layers.0.mlp.proj"
    assert torch.equal(torch.cat([r[f"{proj}.weights_scaling_factor"] for r in ranks], 1),
                       one[f"{proj}.weights_scaling_factor"])
    assert torch.equal(torch.cat([r[f"{proj}.prequant_scaling_factor"] for r in ranks]),
                       one[f"{proj}.prequant_scaling_factor"])
    # fc and gate read one input: one AWQ factor, so the two can be fused
    assert torch.equal(one[f"{fc}.prequant_scaling_factor"], one["transformer.layers.0.mlp.gate.prequant_scaling_factor"])


def test_awq_scale_formula(checkpoints):
    t = tensors(checkpoints["W4A16_AWQ", 1] / "rank0.safetensors")
    m = "transformer.layers.0.attention.qkv"
    q = _unpack_rows(t[f"{m}.weight"]).float()
    assert q.min() >= -8 and q.max() <= 7
    # every (row, group) reaches the int4 extreme its scale was derived from: scale = group amax / 7
    g = q.reshape(q.shape[0], -1, GROUP).abs().amax(-1)
    assert (g == 7).float().mean() > 0.95


def test_gptq_beats_round_to_nearest_on_the_calibration_set(checkpoints, quant_model, quant_stats):
    """Decoded with the kernel layout's inverse and the stored scales and zeros, GPTQ's weight has a smaller output
    error on the calibration tokens (trace(dW H dW^T)) than rounding each weight to the nearest point of the same
    kind of grid: what GPTQ is for."""
    from safetensors.torch import load_file

    t = tensors(checkpoints["W4A16_GPTQ", 1] / "rank0.safetensors")
    m = "transformer.layers.0.mlp.fc"
    q = unpreprocess_weights_for_mixed_gemm(t[f"{m}.weight"], 4, 80).float()  # (in, out) signed
    scale, zero = t[f"{m}.weights_scaling_factor"], t[f"{m}.zero"]  # (in / G, out)
    w = (q * scale.repeat_interleave(GROUP, 0) + zero.repeat_interleave(GROUP, 0)).t()
    src = load_file(str(next(quant_model.glob("*.safetensors"))))["model.layers.0.mlp.gate_proj.weight"]
    g = src.reshape(src.shape[0], -1, GROUP)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / 15
    z = torch.round(-lo / s)
    rtn = ((torch.clamp(torch.round(g / s) + z, 0, 15) - z) * s).reshape(src.shape)
    h = StatsReader(quant_stats).input(0, "mlp.fc", hessian=True).hessian.double()

    def err(x):
        d = (x - src).double()
        return float(((d @ h) * d).sum())

    assert err(w) < 0.8 * err(rtn)
    assert json.loads((checkpoints["W4A16_GPTQ", 1] / "quant_layout.json").read_text()) == {"gptq_sm": 80}


def test_gptq_factors_each_input_once(quant_model, quant_stats, tmp_path, monkeypatch):
    """mlp.fc and mlp.gate read one input: GPTQ's damped inverse factor is computed once for both (one per input of
    each layer: qkv, dense, fc and gate, proj), and the checkpoint equals the one computed with a factor per module."""
    from pipeline.quantize import algorithms
    from pipeline.quantize.writer import TargetQuantizer

    original, calls = algorithms._damped_inverse_factor, []
    monkeypatch.setattr(algorithms, "_damped_inverse_factor",
                        lambda h, damp, what: calls.append(what) or original(h, damp, what))
    convert_quantized(quant_model, quant_stats, tmp_path / "shared", "W4A16_GPTQ")
    inputs = [f"transformer.layers.{i}.{m}" for i in (0, 1)
              for m in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.proj")]
    assert sorted(calls) == sorted(inputs)

    calls.clear()
    read_stats = TargetQuantizer._stats

    def fresh_stats(self, layer, module):  # new statistics for every module: a factor per module
        self._input_stats = {}
        return read_stats(self, layer, module)

    monkeypatch.setattr(TargetQuantizer, "_stats", fresh_stats)
    convert_quantized(quant_model, quant_stats, tmp_path / "per_module", "W4A16_GPTQ")
    assert len(calls) == len(inputs) + 2  # mlp.gate's own, in both layers
    shared, per_module = (tensors(tmp_path / d / "rank0.safetensors") for d in ("shared", "per_module"))
    assert shared.keys() == per_module.keys()
    for name, value in shared.items():  # bit for bit: the packed weights' float16 containers hold NaN patterns
        assert torch.equal(value.view(torch.uint8), per_module[name].view(torch.uint8)), name


def test_smoothquant_formulas(checkpoints):
    t = tensors(checkpoints["W8A8_SQ_PER_CHANNEL", 1] / "rank0.safetensors")
    m = "transformer.layers.0.mlp.fc"
    q, s = t[f"{m}.weight"].float(), t[f"{m}.weights_scaling_factor"]
    assert (q.abs().amax(1) == 127).all()  # per output row: amax / 127
    assert torch.equal(t[f"{m}.prequant_scaling_factor"], t["transformer.layers.0.mlp.gate.prequant_scaling_factor"])
    assert (s > 0).all()


@pytest.mark.parametrize("kv", ["INT8", "FP8"])
def test_kv_cache_scales_are_calibrated(quant_model, quant_stats, tmp_path, kv):
    convert_quantized(quant_model, quant_stats, tmp_path, None, kv=kv)
    t = tensors(tmp_path / "rank0.safetensors")
    scales = [t[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"] for i in range(2)]
    assert all(s.dtype == torch.float32 and s.shape == (1,) for s in scales)
    assert all(float(s) != 1.0 and float(s) > 0 for s in scales)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": kv}
    assert validate_checkpoint(tmp_path) == []


def test_group_size_must_divide_each_ranks_input(quant_model, quant_stats, tmp_path):
    # tp4 row-parallel dense: 128 / 4 = 32 input columns per rank, not a whole number of 64-wide groups
    with pytest.raises(PipelineError, match="group_size=64 does not divide the input width each rank holds"):
        convert_quantized(quant_model, quant_stats, tmp_path, "W4A16_AWQ", tp=4)
    assert not list(tmp_path.glob("rank*"))


def test_gptq_kernel_layout_shape_refused_before_writing(quant_model, quant_stats, tmp_path):
    with pytest.raises(PipelineError, match="GPTQ kernel layout"):
        convert_quantized(quant_model, quant_stats, tmp_path, "W4A16_GPTQ", tp=4, group_size=32)
    assert not list(tmp_path.glob("rank*"))


def test_calibration_needed(quant_model, tmp_path):
    with pytest.raises(PipelineError, match="needs calibration statistics"):
        convert_quantized(quant_model, None, tmp_path, "FP8")


def test_exclude_modules_replaces_defaults(quant_model, quant_stats, tmp_path):
    convert_quantized(quant_model, quant_stats, tmp_path, "W8A8_SQ_PER_CHANNEL",
                      exclude_modules=["*lm_head", "*vocab_embedding", "transformer.layers.0.*"])
    t = tensors(tmp_path / "rank0.safetensors")
    assert t["transformer.layers.0.mlp.fc.weight"].dtype == torch.float32
    assert t["transformer.layers.1.mlp.fc.weight"].dtype == torch.int8
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization"]["exclude_modules"][-1] == "transformer.layers.0.*"
