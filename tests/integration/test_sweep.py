"""Sweeps: the sweep recipes and the cluster launchers compose; a real multirun with 2 joblib workers over
overlapping points computes each shared artifact once and ends with its report; multi-rank points may not
oversubscribe the cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline.cli import RECIPES_DIR, claim_cores
from pipeline.errors import PipelineError
from tests.conftest import make_tiny_model
from tests.recipes_util import compose_recipe

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted(p.stem for p in (REPO / "recipes" / "sweep").glob("*.yaml"))


def _hydra_cfg(overrides: list[str]):
    with initialize_config_dir(RECIPES_DIR, version_base="1.3"):
        return compose("pipeline", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_recipe_composes(sweep):
    config = compose_recipe([f"+sweep={sweep}"])
    assert config["evaluate"]["test_hf"] and config["build"]["gather_context_logits"]
    text = (REPO / "recipes" / "sweep" / f"{sweep}.yaml").read_text()
    assert "# @package _global_" in text and f"-m +sweep={sweep}" in text, "header must give the launch command"
    params = _hydra_cfg([f"+sweep={sweep}"]).hydra.sweeper.params
    assert params and all("," in str(v) for v in params.values())


def test_quant_sweep_covers_every_quantization_option():
    options = {p.stem for p in (REPO / "recipes" / "quantization").glob("*.yaml")}
    params = _hydra_cfg(["+sweep=smollm2_quant"]).hydra.sweeper.params
    assert set(params["quantization"].split(",")) == options


@pytest.mark.parametrize("launcher, target", [
    ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ("submitit_local", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"),
    ("ray", "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"),
])
def test_launcher_composes(launcher, target):
    plugin = target.split(".")[1]
    pytest.importorskip(f"hydra_plugins.{plugin}", reason=f"{plugin} is an optional extra (pip install -e .[slurm] / .[ray])")
    cfg = _hydra_cfg([f"hydra/launcher={launcher}", "+sweep=smollm2_mapping"])
    assert cfg.hydra.launcher._target_ == target


def test_parallel_multirank_points_may_not_oversubscribe(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.delenv("TRTLLM_PIPELINE_CORES", raising=False)
    tp = lambda n: {"mapping": {"tp_size": n, "pp_size": 1}}  # noqa: E731
    with pytest.raises(PipelineError, match="2 parallel points x 3 ranks .* need 6 cores .* has 4: lower hydra.launcher.n_jobs to 1"):
        claim_cores(tp(3), 2)
    claim_cores(tp(2), 2)
    assert os.environ["TRTLLM_PIPELINE_CORES"] == "2"  # each point's ranks share its half of the machine


def _parallel_sweep(tmp_path, launcher_args: list[str], env: dict[str, str] | None = None):
    """A 4-point build sweep of a tiny model under a parallel launcher: every point's checkpoint is the same artifact."""
    import torch

    torch.manual_seed(0)
    model = make_tiny_model(tmp_path, "llama_gqa_untied")
    sweep_dir, cache = tmp_path / "sweep", tmp_path / "cache"
    args = [sys.executable, "-m", "pipeline.cli", "-m", *launcher_args,
            "model=hf_local", f"model.path={model}", "stages=[build]", "progress=false", f"cache_dir={cache}",
            f"hydra.sweep.dir={sweep_dir}", "build.max_input_len=32", "build.max_seq_len=64",
            "build.smoke_test_tokens=0,2", "build.max_batch_size=2,4"]
    proc = subprocess.run(args, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, capture_output=True,
                          text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sweep_dir.glob("*/run.json")]
    assert len(records) == 4
    convert = [r["stages"]["convert"] for r in records]
    assert len({c["key"] for c in convert}) == 1 and sum(not c["reused"] for c in convert) == 1
    assert len([p for p in (cache / "convert").iterdir() if p.is_dir()]) == 1
    assert len({r["stages"]["build"]["key"] for r in records}) == 4
    report = json.loads((sweep_dir / "report.json").read_text())
    assert report["points"] == 4 and report["failed"] == 0
    return proc


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two parallel points need two cores")
def test_joblib_two_workers_compute_each_shared_artifact_once(tmp_path):
    proc = _parallel_sweep(tmp_path, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
    assert "sweep: 4/4 points done" in proc.stdout


def test_submitit_local_computes_each_shared_artifact_once(tmp_path):
    """submitit's local launcher (the Slurm launcher's configuration, run as local processes: every point at once)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is the `slurm` extra")
    _parallel_sweep(tmp_path, ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15"])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two parallel points need two cores")
def test_ray_local_cluster_computes_each_shared_artifact_once(tmp_path):
    """Ray's launcher on a local 2-CPU cluster (what `ray.init()` starts without an address). hydra-ray-launcher
    pins cloudpickle==2.2.1 while joblib >= 1.5 needs cloudpickle >= 3, so the `ray` extra lives in its own
    environment (docs/SWEEPS.md); this test runs where it is installed."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="hydra-ray-launcher is the optional `ray` extra "
                        "(pip install -e .[ray], in an environment of its own: it pins cloudpickle==2.2.1)")
    _parallel_sweep(tmp_path, ["hydra/launcher=ray", "++hydra.launcher.ray.init.num_cpus=2",
                               "++hydra.launcher.ray.init.include_dashboard=false"],
                    env={"RAY_raylet_start_wait_time_s": "300"})  # a busy 2-core machine starts its raylet slowly


def test_ray_local_cluster_counts_as_parallel_points(monkeypatch):
    from pipeline.cli import launcher_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    ray = "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert launcher_workers({"_target_": ray, "ray": {"init": {"address": None}, "remote": {}}}) == 8
    assert launcher_workers({"_target_": ray, "ray": {"init": {"address": None, "num_cpus": 4},
                                                      "remote": {"num_cpus": 2}}}) == 2
    assert launcher_workers({"_target_": ray, "ray": {"init": {"address": "auto"}, "remote": {}}}) == 1
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert launcher_workers({"_target_": joblib, "n_jobs": -1}) == 8 and launcher_workers({"_target_": joblib, "n_jobs": 2}) == 2
    assert launcher_workers({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}) == 1
    submitit = "hydra_plugins.hydra_submitit_launcher.submitit_launcher"
    assert launcher_workers({"_target_": f"{submitit}.LocalLauncher"}) == 8  # every point at once: one core each
    assert launcher_workers({"_target_": f"{submitit}.SlurmLauncher"}) == 1
