"""Nothing to do costs nothing: a re-run of the default recipe whose every stage is cached decides so from configs
and file headers alone (no torch, transformers, gguf-py or numpy import, no preflight), while a run with work to do
still runs every preflight check before its first stage."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import executor
from pipeline.errors import PipelineError
from pipeline.executor import Estimate, StageSpec, plan_pipeline, run_pipeline
from tests.recipes_util import compose_recipe

REPO = Path(__file__).resolve().parents[2]
HEAVY_MODULES = ("torch", "transformers", "gguf", "numpy", "rouge_score", "datasets", "safetensors")


def _fake_body(ctx):
    (ctx.out_dir / "artifact.json").write_text(json.dumps({"stage": ctx.name}))
    return {}


def populate_with_fake_artifacts(config: dict, cache: Path) -> list[str]:
    """Publish an artifact under the real key of every stage the recipe plans (bodies replaced: the keys, not the
    artifacts, are what a re-run decides on). Returns the stage names."""
    planned = plan_pipeline(config, list(config["stages"]))
    fake = [dataclasses.replace(p, spec=dataclasses.replace(p.spec, run=_fake_body, preflight=None)) for p in planned]
    run_pipeline(config, cache, list(config["stages"]), progress=False, planned=fake)
    return [p.spec.name for p in planned]


RERUN = textwrap.dedent("""
    import json, sys
    args, watched = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    from pipeline import cli
    sys.argv = ["trtllm-pipeline", *args]
    try:
        cli.main()
    finally:
        heavy = sorted(m for m in watched if m in sys.modules)
        print("HEAVY_MODULES " + json.dumps(heavy), file=sys.stderr)
""")


def rerun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", RERUN, json.dumps(args), json.dumps(HEAVY_MODULES)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("quantization, planned", [
    ("none", ["convert", "build", "reference", "evaluate"]),
    ("w4a16_awq", ["calibrate", "convert", "build", "reference", "evaluate"]),
    ("w8a8_sq_per_channel", ["calibrate", "convert", "build", "reference", "evaluate"]),
    ("fp8", ["calibrate", "convert", "build", "reference", "evaluate"]),
])
def test_cached_rerun_imports_no_tensor_library(smollm2_gguf, tmp_path, quantization, planned):
    cache = tmp_path / "cache"
    args = [f"cache_dir={cache}", "progress=false", f"hydra.run.dir={tmp_path / 'run'}", f"quantization={quantization}"]
    stages = populate_with_fake_artifacts(compose_recipe(args), cache)
    assert stages == planned
    done = rerun(args, tmp_path)
    assert done.returncode == 0, done.stderr
    for name in stages:
        assert any(line.startswith(name) and "reused" in line for line in done.stdout.splitlines()), done.stdout
    heavy = json.loads(done.stderr.split("HEAVY_MODULES ")[-1])
    assert heavy == [], f"a cached re-run imported {heavy}"
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert all(s["reused"] for s in record["stages"].values())


def test_cached_rerun_with_a_changed_key_does_the_work_checks_first(smollm2_gguf, tmp_path):
    """The same cache with a setting that changes the build key: the run is no longer a no-op, so every preflight
    check runs again before any stage (here the disk/memory gate on the engine)."""
    cache = tmp_path / "cache"
    args = [f"cache_dir={cache}", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"]
    populate_with_fake_artifacts(compose_recipe(args), cache)
    done = rerun([*args, "build.max_batch_size=4", "build.max_memory=1MB"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert "error: build.max_memory=1MB" in done.stderr
    assert len([p for p in (cache / "build").iterdir() if p.is_dir()]) == 1  # nothing new was built


# -- the executor's rule, on fake stages ---------------------------------------------------------------------------
@pytest.fixture
def counted_stages(monkeypatch):
    """convert -> build with counting preflights and bodies; build's preflight fails when asked to."""
    calls = {"preflight": [], "run": []}
    state = {"fail": False}

    def preflight(name):
        def check(cfg, facts):
            calls["preflight"].append(name)
            if name == "build" and state["fail"]:
                raise PipelineError("build: impossible limits")
            return Estimate(disk_bytes=1, what=name)
        return check

    def body(name):
        def run(ctx):
            calls["run"].append(name)
            (ctx.out_dir / "out.txt").write_text(json.dumps(ctx.config))
            return {}
        return run

    monkeypatch.setitem(executor.STAGES, "convert", StageSpec("convert", 1, ("dtype",), body("convert"),
                                                              preflight=preflight("convert")))
    monkeypatch.setitem(executor.STAGES, "build", StageSpec("build", 1, ("build",), body("build"), needs=("convert",),
                                                            preflight=preflight("build")))
    return calls, state


def test_all_reused_skips_preflight_and_any_work_runs_all_of_it_first(counted_stages, tmp_path):
    calls, state = counted_stages
    config = {"dtype": "float32", "build": {"max_batch_size": 1}}
    run_pipeline(config, tmp_path, ["build"], progress=False)
    assert calls == {"preflight": ["convert", "build"], "run": ["convert", "build"]}
    calls["preflight"].clear(), calls["run"].clear()
    state["fail"] = True  # a gate that now refuses: nothing runs, so nothing is refused
    result = run_pipeline(config, tmp_path, ["build"], progress=False)
    assert all(o.reused for o in result.stages) and calls == {"preflight": [], "run": []}
    # A changed build key: work to do, so every preflight runs (the cached convert's too) before any body.
    with pytest.raises(PipelineError, match="impossible limits"):
        run_pipeline({**config, "build": {"max_batch_size": 2}}, tmp_path, ["build"], progress=False)
    assert calls == {"preflight": ["convert", "build"], "run": []}
    # force: work to do as well.
    calls["preflight"].clear()
    with pytest.raises(PipelineError, match="impossible limits"):
        run_pipeline(config, tmp_path, ["build"], progress=False, force_stages=("build",))
    assert calls == {"preflight": ["convert", "build"], "run": []}


def test_an_invalid_cached_entry_is_work_and_gets_its_preflight(counted_stages, tmp_path):
    calls, state = counted_stages
    config = {"dtype": "float32", "build": {"max_batch_size": 1}}
    result = run_pipeline(config, tmp_path, ["build"], progress=False)
    build_dir = result.stages[-1].artifact
    (build_dir / "out.txt").write_text("truncated")  # another size than the manifest records
    calls["preflight"].clear(), calls["run"].clear()
    result = run_pipeline(config, tmp_path, ["build"], progress=False)
    assert calls == {"preflight": ["convert", "build"], "run": ["build"]}
    assert [o.reused for o in result.stages] == [True, False]
