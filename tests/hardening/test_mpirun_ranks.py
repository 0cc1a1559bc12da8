"""Multi-rank runs: kill -9 of one rank of an mpirun (the build's tp2 smoke test, then the tp2 evaluation) ends the
run with one error line and nothing half-published, and the same command then resumes to artifacts byte-identical
to an uninterrupted run; a job started with another number of ranks than the mapping is one error line naming both.

The rank kills itself at a named point (`TRTLLM_PIPELINE_KILL_AT` with `TRTLLM_PIPELINE_KILL_RANK=1`): no timing
luck. The surviving rank must not hang: mpirun stops it, and the test would time out if it did not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.badinput.harness import invoke
from tests.hardening.common import REPO, final_outputs, leftovers

pytest.importorskip("mpi4py")


@pytest.fixture(scope="module")
def tiny_with_tokenizer(smollm2_gguf, tmp_path_factory):
    """A tiny random Llama with the default model's tokenizer saved beside it (the evaluation needs one)."""
    from transformers import AutoTokenizer

    from tests.conftest import make_tiny_model

    model_dir = make_tiny_model(tmp_path_factory.mktemp("tiny_tok"), "llama_gqa_untied", vocab_size=49152)
    AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).save_pretrained(model_dir)
    return model_dir


def tp2_recipe(model: Path, cache: Path, run_dir: Path) -> list[str]:
    return ["model=hf_local", f"model.path={model}", f"cache_dir={cache}", "progress=false", f"hydra.run.dir={run_dir}",
            "mapping.tp_size=2", "stages=[convert,build,evaluate]", "build.smoke_test_tokens=2",
            "build.max_input_len=96", "build.max_seq_len=128", "evaluate=tldr", "evaluate.max_ite=2",
            "evaluate.batch_size=1", "evaluate.output_len=4", "evaluate.max_input_length=96"]


@pytest.fixture(scope="module")
def reference(tiny_with_tokenizer, tmp_path_factory):
    """An uninterrupted tp2 run: its run directory."""
    root = tmp_path_factory.mktemp("mpirun_reference")
    result = invoke(tp2_recipe(tiny_with_tokenizer, root / "cache", root / "run"))
    assert result.code == 0, result.stderr
    return root / "run"


def published(cache: Path) -> set[str]:
    return {s.name for s in cache.iterdir() if s.is_dir() and any(not d.name.startswith(".") and d.is_dir()
                                                                    for d in s.iterdir())}


def deterministic(outputs: dict[str, dict]) -> dict[str, dict]:
    """Every artifact file but the evaluation's report.json, which holds the measured speed."""
    return {stage: {f: o for f, o in files.items() if not (stage == "evaluate" and f == "report.json")}
            for stage, files in outputs.items()}


def killed_rank_run(model: Path, cache: Path, run_dir: Path, point: str, monkeypatch) -> str:
    monkeypatch.setenv("TRTLLM_PIPELINE_KILL_AT", point)
    monkeypatch.setenv("TRTLLM_PIPELINE_KILL_RANK", "1")
    result = invoke(tp2_recipe(model, cache, run_dir))
    monkeypatch.delenv("TRTLLM_PIPELINE_KILL_AT")
    monkeypatch.delenv("TRTLLM_PIPELINE_KILL_RANK")
    assert result.code == 2, result.stderr
    assert len(result.error_lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert leftovers(cache) == []
    return result.error_lines[0]


def test_a_killed_rank_ends_the_run_and_the_same_command_resumes(tiny_with_tokenizer, reference, tmp_path,
                                                                  monkeypatch):
    cache = tmp_path / "cache"
    # Rank 1 of the build's smoke test dies once both ranks joined: the build stage fails, convert stays published.
    line = killed_rank_run(tiny_with_tokenizer, cache, tmp_path / "killed-build", "rank:joined", monkeypatch)
    assert "pipeline.run failed: a rank (pid" in line and "was ended by signal 9 (SIGKILL)" in line, line
    assert published(cache) == {"convert"}
    # Rank 1 of the evaluation dies after its first batch: the build (re-run) is published, the evaluation is not.
    line = killed_rank_run(tiny_with_tokenizer, cache, tmp_path / "killed-eval", "evaluate:batch", monkeypatch)
    assert "pipeline.evaluate.engine_eval failed: a rank (pid" in line and "signal 9 (SIGKILL)" in line, line
    assert published(cache) == {"convert", "build"}

    again = invoke(tp2_recipe(tiny_with_tokenizer, cache, tmp_path / "again"))
    assert again.code == 0, again.stderr
    stages = json.loads((tmp_path / "again" / "run.json").read_text())["stages"]
    assert {s: stages[s]["reused"] for s in stages} == {"convert": True, "build": True, "evaluate": False}
    assert deterministic(final_outputs(tmp_path / "again")) == deterministic(final_outputs(reference))
    assert leftovers(cache) == []


def test_the_report_counts_truncated_samples(tiny_with_tokenizer, reference):
    """The shipped articles are longer than the 96 tokens the limits leave for a prompt."""
    from transformers import AutoTokenizer

    from pipeline.evaluate.data import load_samples
    from pipeline.evaluate.prompts import tldr_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_with_tokenizer)
    articles = {s.id: s.input for s in load_samples(None, "article", "highlights")}
    artifact = Path(json.loads((reference / "run.json").read_text())["stages"]["evaluate"]["artifact"])
    rows = [json.loads(x) for x in (artifact / "outputs.jsonl").read_text().splitlines()]
    longer = [len(tokenizer.encode(tldr_text(articles[r["id"]]))) > 96 for r in rows]
    report = json.loads((artifact / "report.json").read_text())
    assert any(longer) and report["prompt"]["truncated_samples"] == sum(longer)
    assert report["prompt"]["max_prompt_tokens"] == 96
    assert [r["prompt_tokens"] == 96 for r in rows] == longer


def rank_environment() -> dict[str, str]:
    from pipeline.runtime.launch import rank_environment as env

    return {**env(str(mpirun())), "PYTHONPATH": str(REPO)}


def mpirun() -> Path:
    from pipeline.runtime.launch import find_mpirun

    return find_mpirun()


def one_error(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and "BAD TERMINATION" not in proc.stderr + proc.stdout, proc.stderr
    return errors[0]


def test_engine_started_with_another_number_of_ranks(reference):
    engine = json.loads((reference / "run.json").read_text())["stages"]["build"]["artifact"]
    proc = subprocess.run([str(mpirun()), "-n", "3", sys.executable, "-m", "pipeline.run", "--engine_dir", engine,
                           "--input_ids", "1,2,3", "--max_new_tokens", "2"], env=rank_environment(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert ("the engine was built for world_size=2 (tp_size=2 x pp_size=1) but this job has 3 rank(s); launch it "
            "with: mpirun -n 2") in one_error(proc)


def test_pipeline_started_under_an_outer_mpirun(tiny_with_tokenizer, tmp_path):
    args = tp2_recipe(tiny_with_tokenizer, tmp_path / "cache", tmp_path / "run")
    proc = subprocess.run([str(mpirun()), "-n", "3", sys.executable, "-m", "pipeline.cli", *args],
                          env=rank_environment(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert ("trtllm-pipeline was started under mpirun with 3 ranks, but it runs as one process and starts the "
            "engine's mapping.world_size=2 ranks itself") in one_error(proc)
    assert not (tmp_path / "cache").exists()
    assert os.environ.get("PMI_SIZE") is None  # this test process itself is no rank
