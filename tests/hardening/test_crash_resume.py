"""kill -9 at sampled points of every stage, then the same command: it completes, reuses what was published,
recomputes what was not, leaves no temp or lock behind, and its final artifacts are byte-identical to an
uninterrupted run. The process kills itself at a named point (pipeline.faults): no timing luck.
`python scripts/crash_matrix.py` kills at every point, every tensor and every rank file included."""

from __future__ import annotations

import json
import signal

import pytest

from tests.badinput.harness import invoke
from tests.conftest import make_tiny_model
from tests.hardening.common import final_outputs, leftovers, recipe, spawn

# One point inside each stage body, and the executor's points around publishing (the rest: scripts/crash_matrix.py).
SAMPLED_POINTS = ("convert:tensor#7", "convert:published", "build:rank#1")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("crash"), "llama_mha_tied")


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    result = invoke(recipe(model, root / "cache", root / "run"))
    assert result.code == 0, result.stderr
    return final_outputs(root / "run")


@pytest.mark.parametrize("point", SAMPLED_POINTS)
def test_killed_run_resumes_to_identical_artifacts(point, model, reference, tmp_path):
    cache = tmp_path / "cache"
    killed = spawn(recipe(model, cache, tmp_path / "killed"), TRTLLM_PIPELINE_KILL_AT=point)
    _, err = killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL, f"{point} was never reached:\n{err}"

    again = invoke(recipe(model, cache, tmp_path / "again"))
    assert again.code == 0, again.stderr
    assert final_outputs(tmp_path / "again") == reference
    record = json.loads((tmp_path / "again" / "run.json").read_text())["stages"]
    stage = point.split(":")[0]
    published_before_kill = point.endswith(":published")
    assert record[stage]["reused"] is published_before_kill
    if stage == "build":  # convert was published before the kill
        assert record["convert"]["reused"] is True
    assert leftovers(cache) == []
