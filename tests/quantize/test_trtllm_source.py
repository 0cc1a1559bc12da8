"""Quantized and to-be-quantized TensorRT-LLM checkpoints as a source: a quantized checkpoint is resharded with its
stored integers and scales (byte-identical to quantizing straight into the new mapping with the same statistics);
an unquantized one calibrates on the cpu engine built from it and quantizes like its HF original; what cannot be
exact is refused."""

from __future__ import annotations

import pytest

from pipeline.convert.converter import convert
from pipeline.convert.registry import MappingArgs
from pipeline.convert.sources import open_source
from pipeline.errors import PipelineError
from pipeline.quantize.calibrate import calibrate
from tests.convert.test_trtllm_source import assert_same_checkpoint
from tests.quantize.conftest import CALIBRATION, convert_quantized, quantization


def from_checkpoint(ckpt, out, tp=1, pp=1, dtype="float32", q=None, stats=None):
    src = open_source("trtllm", ckpt)
    try:
        return convert(src, out, dtype, MappingArgs(tp, pp), progress=False, quantization=q, stats_dir=stats)
    finally:
        src.close()


CASES = [("FP8", None), ("W4A16_AWQ", None), ("W4A8_AWQ", "FP8"), ("W8A8_SQ_PER_CHANNEL", "INT8"), (None, "FP8")]


@pytest.mark.parametrize("algo,kv", CASES, ids=[f"{a}-{k}" for a, k in CASES])
def test_quantized_checkpoint_reshards_as_stored(quant_model, quant_stats, tmp_path, algo, kv):
    convert_quantized(quant_model, quant_stats, tmp_path / "tp1", algo, kv)
    # quantization unset: keep what the checkpoint holds; no statistics are needed
    from_checkpoint(tmp_path / "tp1", tmp_path / "via", tp=2, pp=2, q=quantization(None))
    convert_quantized(quant_model, quant_stats, tmp_path / "direct", algo, kv, tp=2, pp=2)
    assert_same_checkpoint(tmp_path / "via", tmp_path / "direct")
    # restating the same quantization is the same request
    from_checkpoint(tmp_path / "via", tmp_path / "back", q=quantization(algo, kv))
    assert_same_checkpoint(tmp_path / "back", tmp_path / "tp1")


def test_unquantized_checkpoint_calibrates_and_quantizes(quant_model, quant_stats, tmp_path):
    """Statistics from the cpu engine built from the checkpoint equal those of the HF model, and the AWQ checkpoint
    quantized from it equals the one quantized from HF."""
    from transformers import AutoTokenizer

    convert_quantized(quant_model, quant_stats, tmp_path / "float", None)
    AutoTokenizer.from_pretrained(quant_model).save_pretrained(tmp_path / "float" / "tokenizer")  # as the stage does
    stats = tmp_path / "stats"
    stats.mkdir()
    src = open_source("trtllm", tmp_path / "float")
    try:
        calibrate(src, stats, CALIBRATION, True, None, progress=False)
    finally:
        src.close()
    for f in sorted(quant_stats.glob("*.safetensors")):
        assert (stats / f.name).read_bytes() == f.read_bytes(), f.name
    from_checkpoint(tmp_path / "float", tmp_path / "via", tp=2, q=quantization("W4A16_AWQ"), stats=stats)
    convert_quantized(quant_model, quant_stats, tmp_path / "direct", "W4A16_AWQ", tp=2)
    assert_same_checkpoint(tmp_path / "via", tmp_path / "direct")


def test_refusals(quant_model, quant_stats, tmp_path):
    convert_quantized(quant_model, quant_stats, tmp_path / "awq", "W4A16_AWQ")
    with pytest.raises(PipelineError, match="already quantized .* re-quantizing"):
        from_checkpoint(tmp_path / "awq", tmp_path / "x", q=quantization("FP8"))
    with pytest.raises(PipelineError, match="re-typing to float16 would round them"):
        from_checkpoint(tmp_path / "awq", tmp_path / "x", dtype="float16")
    # 128 input channels in groups of 64: tp4 would give each rank of a row-parallel layer half a group
    with pytest.raises(PipelineError, match="group_size=64 does not divide"):
        from_checkpoint(tmp_path / "awq", tmp_path / "x", tp=4)
    src = open_source("trtllm", tmp_path / "awq")
    with pytest.raises(PipelineError, match="holds it quantized"):
        src.read("layers.0.attn.q.weight")
    convert_quantized(quant_model, quant_stats, tmp_path / "gptq", "W4A16_GPTQ")
    with pytest.raises(PipelineError, match="GPU kernel's layout"):
        from_checkpoint(tmp_path / "gptq", tmp_path / "y", tp=2)
