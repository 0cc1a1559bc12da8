"""The evaluate stage on the default model (SmolLM2-135M-Instruct): engine against transformers, accuracy gate,
perplexity; and multi-rank evaluation equals single-rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.executor import run_pipeline
from pipeline.schemas import schema_errors
from tests.recipes_util import compose_recipe

REPO = Path(__file__).resolve().parents[2]
SMALL = ["progress=false", "evaluate.max_ite=1", "evaluate.batch_size=3", "evaluate.output_len=24",
         "build.max_input_len=512", "build.max_seq_len=560", "build.smoke_test_tokens=0"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(smollm2_gguf, tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def run(cache: Path, *overrides: str):
    result = run_pipeline(compose_recipe([*SMALL, *overrides]), cache, ["evaluate"], progress=False)
    return {o.name: o for o in result.stages}, result


def test_engine_equals_transformers_on_the_default_model(cache):
    stages, _ = run(cache)
    artifact = stages["evaluate"].artifact
    report = json.loads((artifact / "report.json").read_text())
    assert schema_errors(report, "report") == []
    assert report["n"] == 3 and report["agreement"]["identical_fraction"] == 1.0
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert report["engine"][key] == report["hf"][key]
    rows = [json.loads(line) for line in (artifact / "outputs.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["engine"] == r["hf"] and r["reference"] for r in rows)
    assert report["engine"]["tokens_per_second"] > 0 and report["engine"]["ttft_seconds"] > 0


def test_accuracy_gate_fails_above_and_passes_below_the_score(cache):
    stages, _ = run(cache)
    achieved = stages["evaluate"].metrics["engine_rouge1"]
    above, result = run(cache, "evaluate.check_accuracy=true", f"evaluate.tensorrt_llm_rouge1_threshold={achieved + 1}")
    assert above["evaluate"].reused  # thresholds are judged on the cached metrics, never re-evaluated
    assert result.failed_checks() and "not above the threshold" in result.failed_checks()[0]
    below, result = run(cache, "evaluate.check_accuracy=true", f"evaluate.tensorrt_llm_rouge1_threshold={achieved - 1}")
    assert result.failed_checks() == [] and below["evaluate"].checks["rouge1_threshold"] == achieved - 1


def test_accuracy_gate_exit_code_through_the_cli(cache, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "pipeline.cli", *SMALL, f"cache_dir={cache}", f"hydra.run.dir={tmp_path}",
            "evaluate.check_accuracy=true", "evaluate.tensorrt_llm_rouge1_threshold=99"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "error: accuracy check failed" in proc.stderr
    assert json.loads((tmp_path / "run.json").read_text())["checks"]["evaluate"]["failed"]


def test_engine_perplexity_equals_transformers(cache):
    stages, _ = run(cache, "evaluate=ppl", "build.gather_context_logits=true", "evaluate.ppl_max_windows=4",
                    "evaluate.ppl_window=128")
    metrics = stages["evaluate"].metrics
    assert metrics["engine_ppl"] == pytest.approx(metrics["hf_ppl"], rel=1e-3)
    assert 1 < metrics["engine_ppl"] < 100


@pytest.fixture(scope="module")
def tiny_with_tokenizer(smollm2_gguf, tmp_path_factory):
    """A tiny random Llama with the default model's vocabulary and tokenizer saved beside it."""
    from transformers import AutoTokenizer

    from tests.conftest import make_tiny_model

    root = tmp_path_factory.mktemp("tiny_tok")
    model_dir = make_tiny_model(root, "llama_gqa_untied", vocab_size=49152)
    AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).save_pretrained(model_dir)
    return model_dir


def test_multirank_evaluation_equals_single_rank(tiny_with_tokenizer, tmp_path):
    common = ["model=hf_local", f"model.path={tiny_with_tokenizer}", "progress=false", "evaluate=tldr",
              "evaluate.max_ite=2", "evaluate.batch_size=2", "evaluate.output_len=8", "build.max_input_len=96",
              "build.max_seq_len=128", "build.smoke_test_tokens=0", "evaluate.max_input_length=96",
              "evaluate.eval_ppl=true", "build.gather_context_logits=true", "evaluate.ppl_max_windows=2",
              "evaluate.ppl_window=64"]
    one = run_pipeline(compose_recipe(common), tmp_path, ["evaluate"], progress=False).stages[-1]
    two = run_pipeline(compose_recipe([*common, "mapping.tp_size=2"]), tmp_path, ["evaluate"], progress=False).stages[-1]
    assert two.key != one.key
    for key in ("engine_rouge1", "engine_rouge2", "engine_rougeL", "engine_rougeLsum"):
        assert two.metrics[key] == one.metrics[key]
    assert two.metrics["engine_ppl"] == pytest.approx(one.metrics["engine_ppl"], rel=1e-5)
    rows = lambda o: [json.loads(x)["engine"] for x in (o.artifact / "outputs.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(one) == rows(two)


def test_beam_search_evaluation_equals_transformers_and_tp2_equals_tp1(tiny_with_tokenizer, tmp_path):
    """evaluate.num_beams=2: the engine's best beam equals transformers' num_beams generate on every sample, and a
    tp2 engine evaluates to the same outputs."""
    common = ["model=hf_local", f"model.path={tiny_with_tokenizer}", "progress=false", "evaluate=tldr",
              "evaluate.max_ite=2", "evaluate.batch_size=2", "evaluate.output_len=8", "build.max_input_len=96",
              "build.max_seq_len=128", "build.smoke_test_tokens=0", "evaluate.max_input_length=96",
              "evaluate.test_hf=true", "evaluate.num_beams=2", "build.max_beam_width=2"]
    one = run_pipeline(compose_recipe(common), tmp_path, ["evaluate"], progress=False).stages[-1]
    report = json.loads((one.artifact / "report.json").read_text())
    assert report["n"] == 4 and report["agreement"]["identical_fraction"] == 1.0
    two = run_pipeline(compose_recipe([*common, "mapping.tp_size=2"]), tmp_path, ["evaluate"], progress=False).stages[-1]
    rows = lambda o: [json.loads(x)["engine"] for x in (o.artifact / "outputs.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(one) == rows(two)
