"""The stage executor: reuse, selective recomputation, force, and crash safety."""

from __future__ import annotations

import dataclasses

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline import executor
from pipeline.errors import PipelineError
from pipeline.executor import StageSpec, run_pipeline
from tests.recipes_util import compose_recipe

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_downstream(monkeypatch):
    """Register counting build and evaluate stages in their slots (their real bodies come with later versions)."""
    calls = {"build": 0, "evaluate": 0}

    def make(name):
        def body(ctx):
            calls[name] += 1
            (ctx.out_dir / f"{name}.json").write_text(json.dumps({"config": ctx.config, "inputs": sorted(ctx.inputs)}))
            return {"calls": calls[name]}
        return body

    monkeypatch.setitem(executor.STAGES, "build", StageSpec("build", 1, ("build",), make("build"), needs=("convert",)))
    monkeypatch.setitem(executor.STAGES, "evaluate",
                        StageSpec("evaluate", 1, ("evaluate",), make("evaluate"), needs=("build",)))
    return calls


def config_for(model_dir: Path, *overrides: str) -> dict:
    return compose_recipe(["model=hf_local", f"model.path={model_dir}", "progress=false", *overrides])


def run(cfg: dict, cache: Path, stages=("convert",), **kw):
    result = run_pipeline(cfg, cache, list(stages), progress=False, **kw)
    return {o.name: o for o in result.stages}


def test_second_run_reuses_and_never_calls_the_stage_body(tiny_models, tmp_path, monkeypatch):
    cfg = config_for(tiny_models["llama_mha_tied"])
    first = run(cfg, tmp_path)
    assert not first["convert"].reused
    spec = executor.STAGES["convert"]

    def must_not_run(ctx):
        raise AssertionError("stage body called on a cache hit")

    monkeypatch.setitem(executor.STAGES, "convert", dataclasses.replace(spec, run=must_not_run))
    second = run(cfg, tmp_path)
    assert second["convert"].reused and second["convert"].key == first["convert"].key
    assert second["convert"].metrics == first["convert"].metrics


def test_only_the_affected_stages_recompute(tiny_models, tmp_path, fake_downstream):
    model = tiny_models["llama_mha_tied"]
    all_stages = ("convert", "build", "evaluate")
    base = run(config_for(model), tmp_path, all_stages)
    assert fake_downstream == {"build": 1, "evaluate": 1}

    ev = run(config_for(model, "evaluate.max_ite=3"), tmp_path, all_stages)
    assert [ev[s].reused for s in all_stages] == [True, True, False]

    bd = run(config_for(model, "build.max_batch_size=2"), tmp_path, all_stages)
    assert [bd[s].reused for s in all_stages] == [True, False, False]

    cv = run(config_for(model, "mapping.tp_size=2"), tmp_path, all_stages)
    assert [cv[s].reused for s in all_stages] == [False, False, False]
    assert cv["build"].key != base["build"].key  # upstream key is part of the downstream key
    assert fake_downstream == {"build": 3, "evaluate": 4}


def test_requesting_a_stage_resolves_its_upstream(tiny_models, tmp_path, fake_downstream):
    out = run(config_for(tiny_models["llama_mha_tied"]), tmp_path, ("build",))
    assert list(out) == ["convert", "build"]


def test_force_recomputes(tiny_models, tmp_path, fake_downstream):
    cfg = config_for(tiny_models["llama_mha_tied"])
    stages = ("convert", "build")
    run(cfg, tmp_path, stages)
    only_build = run(cfg, tmp_path, stages, force_stages=("build",))
    assert [only_build[s].reused for s in stages] == [True, False]
    everything = run(cfg, tmp_path, stages, force=True)
    assert [everything[s].reused for s in stages] == [False, False]
    assert executor.ArtifactCache(tmp_path).lookup("build", everything["build"].key) is not None


def test_model_path_is_not_part_of_the_key_but_content_is(tiny_models, tmp_path):
    original = tiny_models["llama_mha_tied"]
    moved = shutil.copytree(original, tmp_path / "moved")  # copy2 keeps mtimes: same content, other path
    k1 = run(config_for(original), tmp_path / "cache")["convert"]
    k2 = run(config_for(moved), tmp_path / "cache")["convert"]
    assert k2.reused and k1.key == k2.key
    (moved / "config.json").write_text((moved / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    k3 = run(config_for(moved), tmp_path / "cache")["convert"]
    assert not k3.reused and k3.key != k1.key


def test_unimplemented_or_unknown_stage_is_a_clear_error(tiny_models, tmp_path, monkeypatch):
    cfg = config_for(tiny_models["llama_mha_tied"])
    monkeypatch.delitem(executor.STAGE_MODULES, "evaluate")  # a slot whose implementation is not installed
    monkeypatch.delitem(executor.STAGES, "evaluate", raising=False)
    with pytest.raises(PipelineError, match="not implemented"):
        run(cfg, tmp_path, ("evaluate",))
    with pytest.raises(PipelineError, match="unknown stage 'quantize'"):
        run(cfg, tmp_path, ("quantize",))


SLOW_STAGE_SCRIPT = textwrap.dedent("""
    import sys, time, json
    from pathlib import Path
    from pipeline import executor
    from pipeline.executor import StageSpec, run_pipeline

    cache, marker, counter = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

    def slow(ctx):
        with open(counter, "a") as f:
            f.write("computed\\n")
        (ctx.out_dir / "partial.bin").write_bytes(b"half")
        marker.write_text("inside")
        time.sleep(float(sys.argv[4]))
        return {}

    executor.STAGES["build"] = StageSpec("build", 1, ("build",), slow)
    result = run_pipeline({"build": {"x": 1}}, cache, ["build"], progress=False)
    print(json.dumps(result.record()))
""")


def _spawn(tmp_path: Path, name: str, sleep: float) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "slow_stage.py"
    script.write_text(SLOW_STAGE_SCRIPT)
    marker = tmp_path / f"{name}.marker"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(marker), str(tmp_path / "count"),
                             str(sleep)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, marker


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_kill_during_a_stage_publishes_nothing_and_the_next_run_recovers(tmp_path):
    proc, marker = _spawn(tmp_path, "killed", sleep=60)
    _wait_for(marker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    build_dir = tmp_path / "cache" / "build"
    assert [p.name for p in build_dir.iterdir() if not p.name.startswith(".")] != []  # only the lock file remains
    assert all(p.name.startswith(".tmp-") or p.name.endswith((".lock", ".lease")) for p in build_dir.iterdir())
    assert executor.ArtifactCache(tmp_path / "cache").lookup("build", _only_lock_key(build_dir)) is None

    again, _ = _spawn(tmp_path, "again", sleep=0)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert json.loads(out)["stages"]["build"]["reused"] is False
    assert [p.name for p in build_dir.iterdir() if p.name.startswith(".tmp-")] == []  # stale temp cleaned
    assert not list(build_dir.glob("*.lock"))


def _only_lock_key(build_dir: Path) -> str:
    (lock,) = build_dir.glob("*.lock")
    return lock.name[: -len(".lock")]


def test_concurrent_runs_compute_a_stage_once(tmp_path):
    first, marker = _spawn(tmp_path, "first", sleep=3)
    _wait_for(marker)
    second, _ = _spawn(tmp_path, "second", sleep=3)
    out1, err1 = first.communicate(timeout=120)
    out2, err2 = second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert (tmp_path / "count").read_text().count("computed") == 1
    assert json.loads(out2)["stages"]["build"]["reused"] is True
