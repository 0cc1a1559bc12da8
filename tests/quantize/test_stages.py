"""The calibrate stage in the pipeline: computed only when an algorithm needs statistics, shared by algorithms that
need the same statistics, keyed by the calibration settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.executor import run_pipeline
from tests.recipes_util import compose_recipe

SMALL = ["quantization.group_size=64", "quantization.calibration.calib_size=4",
         "quantization.calibration.calib_max_seq_length=32", "quantization.awq_grid=4"]


def run(model: Path, cache: Path, *overrides: str):
    cfg = compose_recipe(["model=hf_local", f"model.path={model}", "progress=false", *SMALL, *overrides])
    return {o.name: o for o in run_pipeline(cfg, cache, ["convert"], progress=False).stages}


def test_calibration_runs_only_when_needed_and_is_shared(quant_model, tmp_path):
    plain = run(quant_model, tmp_path, "quantization=w8a16")
    assert set(plain) == {"convert"}  # per-channel weight-only needs no statistics

    awq = run(quant_model, tmp_path, "quantization=w4a16_awq")
    gptq = run(quant_model, tmp_path, "quantization=w4a16_gptq")
    assert not awq["calibrate"].reused and gptq["calibrate"].reused  # both need Hessians: one artifact
    assert awq["calibrate"].key == gptq["calibrate"].key
    assert awq["convert"].key != gptq["convert"].key

    fp8 = run(quant_model, tmp_path, "quantization=fp8")
    sq = run(quant_model, tmp_path, "quantization=w8a8_sq_per_channel", "quantization.kv_cache_quant_algo=INT8")
    assert not fp8["calibrate"].reused and sq["calibrate"].reused  # ranges only: a second, smaller artifact
    assert fp8["calibrate"].key != awq["calibrate"].key
    assert not list(Path(fp8["calibrate"].artifact).glob("calib-*"))  # the temporary engine is gone

    again = run(quant_model, tmp_path, "quantization=fp8", "quantization.calibration.seed=1")
    assert not again["calibrate"].reused and not again["convert"].reused


def test_unused_quantization_keys_do_not_invalidate_checkpoints(quant_model, tmp_path):
    base = run(quant_model, tmp_path, "quantization=w8a16")
    other = run(quant_model, tmp_path, "quantization=w8a16", "quantization.calibration.calib_size=2",
                "quantization.gptq_damp=0.1")
    assert other["convert"].reused and other["convert"].key == base["convert"].key


def test_too_little_calibration_text_is_a_clear_error(quant_model, tmp_path):
    with pytest.raises(PipelineError, match="fewer than calib_size x calib_max_seq_length"):
        run(quant_model, tmp_path, "quantization=fp8", "quantization.calibration.calib_size=1000")


def test_gptq_source_needs_no_calibration(quant_model, tmp_path):
    from tests.quantize.test_gptq_source import gptq_checkpoint

    model, _ = gptq_checkpoint(quant_model, tmp_path / "gptq")
    stages = run(model, tmp_path / "cache", "quantization=w4a16_gptq")
    assert set(stages) == {"convert"}
    assert set(run(model, tmp_path / "cache", "quantization=w4a16_gptq",
                   "quantization.kv_cache_quant_algo=FP8")) == {"calibrate", "convert"}
