"""Identical runs started together (real processes, released together by a barrier at the first cache lookup)
compute each stage exactly once; recipes that differ downstream share their upstream artifact (a checkpoint, a
calibration); a reader polling the cache meanwhile never sees a half-published artifact."""

from __future__ import annotations

import json
import threading

import pytest

from pipeline.cache import ArtifactCache
from tests.conftest import make_tiny_model
from tests.hardening.common import leftovers, recipe, spawn


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("concurrency"), "llama_mha_tied")


def watch(cache_root, stop: threading.Event, seen: list, problems: list) -> None:
    """Re-hash every published entry as soon as it appears: it must always match its manifest."""
    cache = ArtifactCache(cache_root)
    while not stop.is_set():
        for entry in cache.entries():
            problem = cache.verify(entry)
            seen.append(entry.key)
            if problem is not None and entry.path.exists():
                problems.append(f"{entry.stage}/{entry.key[:12]}: {problem}")
        stop.wait(0.05)


@pytest.mark.parametrize("runs", [2, 4])
def test_runs_started_together_compute_each_stage_once(runs, model, tmp_path):
    cache = tmp_path / "cache"
    # Half the runs (at least one) build with another batch size: same convert artifact, another build artifact.
    variants = [() if i % 2 == 0 else ("build.max_batch_size=4",) for i in range(runs)]
    barrier = f"{tmp_path / 'barrier'}:{runs}@convert:start"
    stop, seen, problems = threading.Event(), [], []
    reader = threading.Thread(target=watch, args=(cache, stop, seen, problems), daemon=True)
    reader.start()
    procs = [spawn(recipe(model, cache, tmp_path / f"run{i}", *variants[i]), TRTLLM_PIPELINE_BARRIER=barrier)
             for i in range(runs)]
    errors = [p.communicate(timeout=900)[1] for p in procs]
    stop.set()
    reader.join()
    assert all(p.returncode == 0 for p in procs), "\n".join(errors)
    records = [json.loads((tmp_path / f"run{i}" / "run.json").read_text())["stages"] for i in range(runs)]
    computed = {s: sum(not r[s]["reused"] for r in records) for s in ("convert", "build")}
    assert computed == {"convert": 1, "build": len(set(variants))}
    assert len({r["convert"]["key"] for r in records}) == 1
    assert problems == [] and seen  # the reader looked at published entries and all were whole
    assert leftovers(cache) == []


def test_recipes_sharing_a_calibration_started_together_compute_it_once(quant_model, tmp_path):
    """AWQ and GPTQ both need the same statistics (activations and Hessians): one calibrate artifact for both, two
    checkpoints. Both processes are held at the calibrate stage's cache lookup until both arrived."""
    from tests.quantize.test_stages import SMALL

    cache = tmp_path / "cache"
    algorithms = ("w4a16_awq", "w4a16_gptq")
    barrier = f"{tmp_path / 'barrier'}:{len(algorithms)}@calibrate:start"
    procs = [spawn(["model=hf_local", f"model.path={quant_model}", f"cache_dir={cache}", "progress=false",
                    f"hydra.run.dir={tmp_path / algo}", "stages=[convert]", f"quantization={algo}", *SMALL],
                   TRTLLM_PIPELINE_BARRIER=barrier) for algo in algorithms]
    errors = [p.communicate(timeout=900)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errors)
    records = [json.loads((tmp_path / algo / "run.json").read_text())["stages"] for algo in algorithms]
    assert sorted(r["calibrate"]["reused"] for r in records) == [False, True]
    assert len({r["calibrate"]["key"] for r in records}) == 1
    assert [r["convert"]["reused"] for r in records] == [False, False]
    assert len({r["convert"]["key"] for r in records}) == 2
    assert len(list((cache / "calibrate").iterdir())) == 1 and leftovers(cache) == []
