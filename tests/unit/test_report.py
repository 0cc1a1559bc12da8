"""The sweep report over fabricated run directories: computed, reused and failed points; the paired comparison
against the unquantized point; the schema; the Pareto front; the PNG; the CLI's `report` subcommand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.evaluate.stats import paired_bootstrap, verdict
from pipeline.report import SweepReport, build_rows, changed_overrides, find_points, load_point, pareto_front, sweep_size, sweep_total, write_report
from pipeline.schemas import schema_errors

REPO = Path(__file__).resolve().parents[2]
KEY = "ab" * 32


def _artifact(root: Path, stage: str, seconds: float, files: dict[str, str] | None = None) -> Path:
    path = root / "cache" / stage / f"{stage}-{seconds}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({"timings": {"seconds": seconds}}))
    for name, text in (files or {}).items():
        (path / name).write_text(text)
    return path


def make_point(root: Path, name: str, quant: str | None, rouge1: list[float], tps: float, engine_bytes: int,
               reused: bool = False, error: str | None = None) -> Path:
    run = root / "sweep" / name
    (run / ".hydra").mkdir(parents=True)
    overrides = ["+sweep=demo", f"quantization={name.split('=')[1]}", f"cache_dir={root / 'cache'}", "progress=false"]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    hydra = {"hydra": {"job": {"config": {"override_dirname": {"exclude_keys": ["cache_dir", "progress"]}}}}}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    config = {"model": {"name": "m"}, "dtype": "float32", "mapping": {"tp_size": 1}, "build": {"max_seq_len": 8},
              "quantization": {"quant_algo": quant, "kv_cache_quant_algo": None},
              "evaluate": {"batch_size": 4, "max_rouge1_drop": 1.0}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if error:
        (run / "error.json").write_text(json.dumps({"error": error}))
        return run
    outputs = "".join(json.dumps({"id": i, "rouge_engine": {"rouge1": r}}) + "\n" for i, r in enumerate(rouge1))
    report = {"engine": {"rouge_ci": {"rouge1": [min(rouge1), max(rouge1)]}}}
    mean = sum(rouge1) / len(rouge1)
    stages = {
        "convert": {"artifact": str(_artifact(root, "convert", 3.0)), "key": KEY, "reused": reused, "seconds": 0 if reused else 3.0},
        "build": {"artifact": str(_artifact(root, "build", 1.0)), "key": KEY, "reused": reused, "seconds": 0 if reused else 1.0},
        "evaluate": {"artifact": str(_artifact(root, f"evaluate-{name}", 5.0, {"outputs.jsonl": outputs,
                                                                             "report.json": json.dumps(report)})),
                     "key": KEY, "reused": reused, "seconds": 0 if reused else 5.0},
    }
    metrics = {"convert": {"bytes": engine_bytes}, "build": {"engine_bytes": engine_bytes},
               "evaluate": {"n": len(rouge1), "engine_rouge1": mean, "engine_tokens_per_second": tps,
                            "kld_mean": 0.01, "top1_agreement": 0.97, "decode_max_batch": 8,
                            "decode_tps_batch_1": tps / 2, "decode_tps_batch_n": tps * 3,
                            "ttft_batch_1_seconds": 0.05, "ttft_batch_n_seconds": 0.3,
                            "rouge1_vs_hf": {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "sd": 0.0, "n": len(rouge1)}}}
    (run / "run.json").write_text(json.dumps({"stages": stages, "metrics": metrics}))
    return run


@pytest.fixture
def sweep(tmp_path):
    base = [30.0, 40.0, 35.0, 50.0]
    make_point(tmp_path, "q=none", None, base, tps=10.0, engine_bytes=400)
    make_point(tmp_path, "q=w8a16", "W8A16", [29.0, 41.0, 35.0, 48.0], tps=14.0, engine_bytes=200, reused=True)
    make_point(tmp_path, "q=w4a16", "W4A16", [20.0, 30.0, 25.0, 40.0], tps=18.0, engine_bytes=100)
    make_point(tmp_path, "q=fp8", "FP8", [], tps=0, engine_bytes=0, error="convert: FP8 needs calibration data")
    return tmp_path / "sweep"


def test_rows_for_computed_reused_and_failed_points(sweep):
    points = [load_point(p) for p in find_points([sweep])]
    assert all(o.split("=")[0] not in ("cache_dir", "progress") for p in points for o in p["overrides"])  # plumbing
    rows = {r["point"]: r for r in build_rows(points)}
    assert set(rows) == {"quantization=none", "quantization=w8a16", "quantization=w4a16", "quantization=fp8"}
    assert rows["quantization=none"]["status"] == "computed" and rows["quantization=w8a16"]["status"] == "reused"
    failed = rows["quantization=fp8"]
    assert failed["status"] == "failed" and failed["error"] == "convert: FP8 needs calibration data"
    assert rows["quantization=w8a16"]["convert_s"] == 3.0  # the artifact's cost, also when this run reused it
    assert rows["quantization=w4a16"]["engine_bytes"] == 100 and rows["quantization=w4a16"]["rouge1_ci"] == [20.0, 40.0]


def test_rows_carry_decode_speed_at_batch_1_and_batch_n(sweep):
    rows = {r["point"]: r for r in build_rows([load_point(p) for p in find_points([sweep])])}
    w4 = rows["quantization=w4a16"]
    assert (w4["decode_tps_b1"], w4["decode_tps_bn"], w4["max_batch"]) == (9.0, 54.0, 8)
    assert (w4["ttft_b1_s"], w4["ttft_bn_s"]) == (0.05, 0.3)
    failed = rows["quantization=fp8"]
    assert failed["decode_tps_b1"] is None and failed["decode_tps_bn"] is None


def test_points_are_compared_with_the_unquantized_point(sweep):
    rows = {r["point"]: r for r in build_rows([load_point(p) for p in find_points([sweep])])}
    w4 = rows["quantization=w4a16"]
    expected = paired_bootstrap([20.0, 30.0, 25.0, 40.0], [30.0, 40.0, 35.0, 50.0])
    assert w4["vs"] == "baseline" and w4["rouge1_diff"] == -10.0 and w4["rouge1_diff_ci"] == [-10.0, -10.0]
    assert expected["mean"] == -10.0 and w4["verdict"] == verdict(expected, 1.0) == "worse"
    assert rows["quantization=w8a16"]["verdict"].startswith("inconclusive")
    # the baseline itself falls back to the reference comparison cached in its metrics
    assert rows["quantization=none"]["vs"] == "reference" and rows["quantization=none"]["verdict"] == "same"


def test_pareto_front():
    rows = [{"rouge1": 40, "tokens_per_second": 10, "engine_bytes": 400}, {"rouge1": 39, "tokens_per_second": 14, "engine_bytes": 200},
            {"rouge1": 30, "tokens_per_second": 12, "engine_bytes": 300}, {"rouge1": None, "tokens_per_second": None, "engine_bytes": None}]
    assert pareto_front(rows) == [0, 1]  # point 2 is beaten by point 1 on every axis
    # with the probe's batch-1 decode speed on every point, the front is judged on it
    probed = [{**r, "decode_tps_b1": b1} for r, b1 in zip(rows, (10, 9, 20, None))]
    probed[3]["tokens_per_second"] = None
    assert pareto_front(probed) == [0, 1, 2]


def test_report_files_schema_and_png(sweep):
    files = write_report([sweep])
    doc = json.loads(files["json"].read_text())
    assert schema_errors(doc, "sweep_report") == [] and doc["points"] == 4 and doc["failed"] == 1
    assert files["png"].stat().st_size > 5000 and files["png"].read_bytes()[:4] == b"\x89PNG"
    md = files["md"].read_text()
    assert "| quantization=fp8 | failed |" in md and "FP8 needs calibration data" in md
    assert "decode_tps_b1 | decode_tps_bn | max_batch | ttft_b1_s" in md and "| 9 | 54 | 8 | 0.05 |" in md
    assert len(files["csv"].read_text().splitlines()) == 5
    broken = {**doc, "rows": [{**doc["rows"][0], "status": "failed", "error": None}]}
    assert schema_errors(broken, "sweep_report")


def test_changed_overrides_and_sweep_size():
    points = [{"overrides": ["+sweep=a", "x=1", "y=2"]}, {"overrides": ["+sweep=a", "x=2", "y=2"]}]
    assert changed_overrides(points) == ["x=1", "x=2"]
    # a multirun records `b=True` where a single run has the `b=true` typed: the same value, not a change
    points = [{"overrides": ["b=True", "q=fp8"]}, {"overrides": ["b=true", "m=tp3"]}, {"overrides": ["b=true"]}]
    assert changed_overrides(points) == ["q=fp8", "m=tp3", "(base)"]
    assert sweep_size(["quantization=none,w8a16,fp8", "mapping.tp_size=1,3", "dtype=float32"]) == 6
    recipe = {"sweeper": {"params": {"quantization": "none,w8a16,fp8", "quantization.kv_cache_quant_algo": "null,INT8"}}}
    assert sweep_total({**recipe, "overrides": {"task": ["+sweep=q"]}}) == 6
    # a key swept (or fixed) on the command line replaces the recipe's values for it
    assert sweep_total({**recipe, "overrides": {"task": ["quantization=none,fp8", "quantization.kv_cache_quant_algo=null"]}}) == 2


def test_report_cli(sweep, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "report", str(sweep / "q=none"), str(sweep / "q=fp8"),
                           "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "report.png").stat().st_size > 0 and "failed" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "report", str(tmp_path / "nothing")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: report:")


def test_callback_is_a_hydra_callback():
    from hydra.experimental.callback import Callback

    assert issubclass(SweepReport, Callback)
