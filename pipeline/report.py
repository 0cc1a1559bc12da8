"""The sweep report: one row per point of a multirun (or per run directory), computed, reused or failed, with the
changed overrides, accuracy and its statistics, sizes, stage times and speed; written as report.md, report.csv,
report.json (schema `schemas/sweep_report.schema.json`) and report.png (accuracy vs tokens/s vs size, Pareto front
marked). Produced by `trtllm-pipeline report <multirun dir or run dirs>` and, at the end of every multirun, by the
`SweepReport` Hydra callback (recipes/pipeline.yaml)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError
from pipeline.evaluate.stats import paired_bootstrap, verdict
from pipeline.schemas import validate

log = logging.getLogger(__name__)

ERROR_FILE = "error.json"  # written into a point's run directory when it fails (pipeline/cli.py)
REPORT_VERSION = 2  # 2: decode speed at batch 1 and at the engine's max batch, time to first token of each
DEFAULT_MAX_DROP = 1.0
COLUMNS = ("point", "status", "rouge1", "rouge1_ci", "rouge2", "rougeL", "ppl", "vs", "rouge1_diff", "rouge1_diff_ci",
           "verdict", "kld_mean", "kld_p99", "top1_agreement", "ppl_ratio", "checkpoint_bytes", "engine_bytes",
           "convert_s", "build_s", "evaluate_s", "batch_size", "tokens_per_second", "ttft_s", "decode_tps_b1",
           "decode_tps_bn", "max_batch", "ttft_b1_s", "ttft_bn_s", "error")
# The speed probe's metrics (pipeline/evaluate/speed.py, via the evaluate stage's headline) -> report columns.
SPEED_COLUMNS = {"decode_tps_b1": "decode_tps_batch_1", "decode_tps_bn": "decode_tps_batch_n",
                 "max_batch": "decode_max_batch", "ttft_b1_s": "ttft_batch_1_seconds",
                 "ttft_bn_s": "ttft_batch_n_seconds"}


def find_points(paths: list[Path]) -> list[Path]:
    """Run directories: each path that is one (it has .hydra/), else its subdirectories that are, sorted."""
    points: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise PipelineError(f"report: {path} is not a directory")
        if (path / ".hydra").is_dir():
            points.append(path)
            continue
        # recursive: an override value with a slash (a path) nests the job's directory
        found = sorted(p.parent.parent for p in path.rglob(".hydra/overrides.yaml"))
        if not found:
            raise PipelineError(f"report: {path} holds no run directories (no */.hydra/overrides.yaml)")
        points += found
    return points


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _manifest_seconds(stage: dict[str, Any] | None) -> float | None:
    """What the artifact cost to compute (from its manifest), also when this run reused it."""
    if not stage:
        return None
    manifest = Path(stage["artifact"]) / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())["timings"]["seconds"]
    return stage["seconds"]


def _per_sample_rouge1(record: dict[str, Any]) -> dict[str, float] | None:
    stage = record.get("stages", {}).get("evaluate")
    path = Path(stage["artifact"]) / "outputs.jsonl" if stage else None
    if path is None or not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {str(r["id"]): r["rouge_engine"]["rouge1"] for r in rows} or None


def load_point(run_dir: Path) -> dict[str, Any]:
    """Everything the report needs from one run directory."""
    hydra = (_yaml(run_dir / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}
    plumbing = set(((hydra.get("job") or {}).get("config") or {}).get("override_dirname", {}).get("exclude_keys") or [])
    overrides = [o for o in _yaml(run_dir / ".hydra" / "overrides.yaml") or [] if _override_key(o) not in plumbing]
    point = {"dir": str(run_dir), "overrides": overrides, "config": _yaml(run_dir / ".hydra" / "config.yaml") or {}}
    if (run_dir / "run.json").is_file():
        point["record"] = json.loads((run_dir / "run.json").read_text())
    elif (run_dir / ERROR_FILE).is_file():
        point["error"] = json.loads((run_dir / ERROR_FILE).read_text())["error"]
    else:
        point["error"] = "no run.json: the point did not finish (killed, or still running)"
    return point


def changed_overrides(points: list[dict[str, Any]]) -> list[str]:
    """Per point, its overrides that are not shared by every point (what the sweep varies), compared by value:
    `x=true` typed on a command line and `x=True` as a multirun records it are the same override. Run plumbing
    (the recipe's override_dirname exclude_keys: paths, cache_dir, progress) was left out when loading."""
    keyed = [{_override_identity(o): o for o in p["overrides"]} for p in points]
    common = set.intersection(*(set(k) for k in keyed)) if keyed else set()
    return [" ".join(o for ident, o in k.items() if ident not in common) or "(base)" for k in keyed]


def _override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _override_identity(override: str) -> tuple[str, str]:
    value = override.partition("=")[2]
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return _override_key(override), json.dumps(parsed, sort_keys=True, default=str)


def _baseline_of(point: dict[str, Any], points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The unquantized engine of the same model, dtype and mapping among the points that finished."""
    cfg = point["config"]
    for other in points:
        oc = other["config"]
        q = oc.get("quantization") or {}
        if ("record" in other and other is not point and not q.get("quant_algo") and not q.get("kv_cache_quant_algo")
                and all(oc.get(k) == cfg.get(k) for k in ("model", "dtype", "mapping", "build"))):
            return other
    return None


def build_rows(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for point, name in zip(points, changed_overrides(points)):
        row: dict[str, Any] = {c: None for c in COLUMNS}
        row["point"] = name
        if "error" in point:
            row.update(status="failed", error=point["error"])
            rows.append(row)
            continue
        rec = point["record"]
        stages, metrics = rec["stages"], rec.get("metrics", {})
        row["status"] = "reused" if all(s["reused"] for s in stages.values()) else "computed"
        ev = metrics.get("evaluate", {})
        for key in ("rouge1", "rouge2", "rougeL", "ppl", "tokens_per_second"):
            row[key] = ev.get(f"engine_{key}")
        row["ttft_s"] = ev.get("engine_ttft_seconds")
        row.update({column: ev.get(metric) for column, metric in SPEED_COLUMNS.items()})
        for key in ("kld_mean", "kld_p99", "top1_agreement", "ppl_ratio"):
            row[key] = ev.get(key)
        row["rouge1_ci"] = _engine_ci(stages.get("evaluate"))
        row["checkpoint_bytes"] = metrics.get("convert", {}).get("bytes")
        row["engine_bytes"] = metrics.get("build", {}).get("engine_bytes")
        for name_ in ("convert", "build", "evaluate"):
            row[f"{name_}_s"] = _manifest_seconds(stages.get(name_))
        row["batch_size"] = (point["config"].get("evaluate") or {}).get("batch_size")
        _compare(row, point, points, ev)
        rows.append(row)
    return rows


def _engine_ci(stage: dict[str, Any] | None) -> list[float] | None:
    path = Path(stage["artifact"]) / "report.json" if stage else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text()).get("engine", {}).get("rouge_ci", {}).get("rouge1")


def _compare(row: dict[str, Any], point: dict[str, Any], points: list[dict[str, Any]], ev: dict[str, Any]) -> None:
    """Paired ROUGE-1 difference against the baseline point, else against the reference (transformers)."""
    delta = ((point["config"].get("evaluate") or {}).get("max_rouge1_drop")) or DEFAULT_MAX_DROP
    diff, vs = None, None
    baseline = _baseline_of(point, points)
    mine = _per_sample_rouge1(point["record"])
    if baseline is not None and mine is not None:
        theirs = _per_sample_rouge1(baseline["record"])
        if theirs is not None and theirs.keys() == mine.keys():
            ids = sorted(mine)
            diff, vs = paired_bootstrap([mine[i] for i in ids], [theirs[i] for i in ids]), "baseline"
    if diff is None and "rouge1_vs_hf" in ev:
        diff, vs = ev["rouge1_vs_hf"], "reference"
    if diff is not None:
        row.update(vs=vs, rouge1_diff=diff["mean"], rouge1_diff_ci=[diff["ci_low"], diff["ci_high"]],
                   verdict=verdict(diff, delta))


def speed_axis(rows: list[dict[str, Any]]) -> str:
    """The speed the front and the plot use: decode tokens/s at batch 1 when every point with a speed has it (the
    probe, same prompt for all), else the evaluation's own tokens/s at evaluate.batch_size."""
    timed = [r for r in rows if r["tokens_per_second"] is not None or r.get("decode_tps_b1") is not None]
    return "decode_tps_b1" if timed and all(r.get("decode_tps_b1") is not None for r in timed) else "tokens_per_second"


def pareto_front(rows: list[dict[str, Any]]) -> list[int]:
    """Indices of the points no other point beats on every axis: ROUGE-1 (higher), tokens/s (higher; speed_axis),
    engine size (lower), and strictly on one."""
    speed = speed_axis(rows)
    pts = [(i, r["rouge1"], r[speed], r["engine_bytes"]) for i, r in enumerate(rows)
           if None not in (r["rouge1"], r[speed], r["engine_bytes"])]

    def dominates(a, b):
        return a[1] >= b[1] and a[2] >= b[2] and a[3] <= b[3] and (a[1] > b[1] or a[2] > b[2] or a[3] < b[3])

    return [p[0] for p in pts if not any(dominates(q, p) for q in pts if q is not p)]


def write_report(paths: list[Path], out_dir: Path | None = None) -> dict[str, Path]:
    """Build the report of the points under `paths` and write its four files into out_dir (default: the single
    path given, else the working directory)."""
    points = [load_point(p) for p in find_points(paths)]
    rows = build_rows(points)
    front = pareto_front(rows)
    for i, row in enumerate(rows):
        row["pareto"] = i in front
    out_dir = out_dir or (paths[0] if len(paths) == 1 else Path.cwd())
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"report_version": REPORT_VERSION, "points": len(rows),
           "failed": sum(r["status"] == "failed" for r in rows), "rows": rows}
    validate(doc, "sweep_report", what="report.json")
    files = {"json": out_dir / "report.json", "csv": out_dir / "report.csv", "md": out_dir / "report.md",
             "png": out_dir / "report.png"}
    files["json"].write_text(json.dumps(doc, indent=2) + "\n")
    _write_csv(files["csv"], rows)
    files["md"].write_text(markdown(rows))
    plot(rows, files["png"])
    return files


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "pareto"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})


MD_COLUMNS = ("point", "status", "rouge1", "rouge1_ci", "rouge2", "rougeL", "ppl", "rouge1_diff", "rouge1_diff_ci",
              "verdict", "kld_mean", "kld_p99", "top1_agreement", "ppl_ratio", "engine_bytes", "convert_s", "build_s",
              "evaluate_s", "decode_tps_b1", "decode_tps_bn", "max_batch", "ttft_b1_s", "pareto")


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# Sweep report", "", f"{len(rows)} points, {sum(r['status'] == 'failed' for r in rows)} failed. "
             "rouge1_diff: per-sample ROUGE-1 minus the baseline's (the unquantized engine of the same model and "
             "mapping when the sweep has it, else transformers), paired bootstrap 95% interval. decode_tps_b1 / "
             "decode_tps_bn: decode tokens/s at batch 1 / at the engine's max batch (max_batch), ttft_b1_s: time to "
             "first token at batch 1, all from one prompt of fixed length (evaluate.speed_prompt_len).", "",
             "| " + " | ".join(MD_COLUMNS) + " |", "|" + "---|" * len(MD_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r[c]).replace("|", "/") for c in MD_COLUMNS) + " |")
    errors = [(r["point"], r["error"]) for r in rows if r["error"]]
    if errors:
        lines += ["", "## Failed points", ""] + [f"- `{p}`: {e}" for p, e in errors]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """ROUGE-1 against tokens/s, marker area by engine size, the Pareto front circled and joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = speed_axis(rows)
    done = [r for r in rows if r["rouge1"] is not None and r[speed] is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    if done:
        biggest = max((r["engine_bytes"] or 1) for r in done)
        sizes = [40 + 400 * (r["engine_bytes"] or 0) / biggest for r in done]
        ax.scatter([r[speed] for r in done], [r["rouge1"] for r in done], s=sizes, alpha=0.6)
        for r in done:
            ax.annotate(r["point"], (r[speed], r["rouge1"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        front = sorted((r for r in done if r.get("pareto")), key=lambda r: r[speed])
        if front:
            ax.plot([r[speed] for r in front], [r["rouge1"] for r in front], "r--", lw=1,
                    label="Pareto front (ROUGE-1, tokens/s, engine size)")
            ax.scatter([r[speed] for r in front], [r["rouge1"] for r in front], s=160,
                       facecolors="none", edgecolors="r")
            ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no point has both ROUGE-1 and tokens/s", ha="center", transform=ax.transAxes)
    xlabel = ("decode tokens/s at batch 1 (engine)" if speed == "decode_tps_b1"
              else "tokens/s (engine, evaluate.batch_size)")
    failed = sum(r["status"] == "failed" for r in rows)
    ax.set(xlabel=xlabel, ylabel="ROUGE-1",
           title=f"{len(rows)} points ({failed} failed); marker area ~ engine bytes")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="trtllm-pipeline report",
                                     description="One comparison report of sweep points: report.md/csv/json/png.")
    parser.add_argument("paths", nargs="+", type=Path, help="a multirun directory, or run directories")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the one path given, else .)")
    args = parser.parse_args(argv)
    files = write_report(args.paths, args.out)
    print((files["md"]).read_text(), end="")
    print("report: " + ", ".join(str(p) for p in files.values()))
    return 0


def sweep_size(task_overrides: list[str]) -> int | None:
    """How many points the basic sweeper makes of these overrides (the product of the swept values' counts)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        total = 1
        for override in OverridesParser.create().parse_overrides(list(task_overrides)):
            if override.is_sweep_override():
                total *= len(list(override.sweep_string_iterator()))
        return total
    except Exception:  # noqa: BLE001 - a count is a courtesy; other sweepers (optuna, ...) decide their own
        return None


def sweep_total(hydra_cfg: dict[str, Any]) -> int | None:
    """Points of a multirun from its hydra config: the command line's sweep overrides and the recipe's
    hydra.sweeper.params, a key given on the command line replacing the recipe's (as the basic sweeper does)."""
    params = (hydra_cfg.get("sweeper") or {}).get("params") or {}
    task = (hydra_cfg.get("overrides") or {}).get("task") or []
    given = {o.split("=", 1)[0].lstrip("+~") for o in task}
    return sweep_size([*task, *(f"{k}={v}" for k, v in params.items() if k not in given)])


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra-core < 1.1
    Callback = object  # type: ignore[assignment,misc]


class SweepReport(Callback):
    """Hydra callback (recipes/pipeline.yaml, hydra.callbacks): after each point, points done/total; at the end of
    a multirun, the report of its points in the sweep directory."""

    def on_job_end(self, config, job_return=None, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return
        sweep_dir = Path(hc.sweep.dir)
        done = sum(1 for p in sweep_dir.rglob(".hydra") if (p.parent / "run.json").is_file()
                   or (p.parent / ERROR_FILE).is_file())
        total = None
        multirun = sweep_dir / "multirun.yaml"  # the sweep as launched: command-line and recipe sweep parameters
        if multirun.is_file():
            total = sweep_total((yaml.safe_load(multirun.read_text()) or {}).get("hydra", {}))
        print(f"sweep: {done}/{total or '?'} points done ({hc.job.override_dirname or 'base'} finished)", flush=True)

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            files = write_report([sweep_dir])
        except PipelineError as e:
            print(f"error: sweep report: {e}", flush=True)
            return
        print(files["md"].read_text(), end="", flush=True)
        print(f"sweep report: {files['md']} (and .csv, .json, .png)", flush=True)
