"""`trtllm-pipeline`: run a recipe (Hydra), `trtllm-pipeline plan <overrides>` (its preflight plan, no work), or
`trtllm-pipeline validate <checkpoint_dir>`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
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
    unknown = unknown_keys(config, PipelineConfig)
    if unknown:  # Hydra's `+key=value` adds keys even to typed nodes; nothing would read them
        raise PipelineError(f"recipe: unknown key(s) {', '.join(unknown)}; check the spelling against the recipe groups")
    return config


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


# `trtllm-pipeline plan <overrides>`: the dry run of the recipe.
_PLAN_ONLY = False


def run_recipe(cfg: DictConfig, run_dir: Path | None):
    from pipeline.executor import run_pipeline, summary_lines, write_run_record
    from pipeline.plan import check_disk, make_plan, plan_lines, write_plan

    config = resolved_config(cfg)
    plan = make_plan(config)
    if config["dry_run"] or _PLAN_ONLY:
        path = write_plan(plan, run_dir if run_dir is not None else Path.cwd())
        print("\n".join([*plan_lines(plan), f"plan written to {path}"]), flush=True)
        return None
    check_disk(plan)  # before anything is written
    result = run_pipeline(
        config,
        cache_root=Path(config["cache_dir"]),
        requested=list(config["stages"]),
        force=config["force"],
        force_stages=tuple(config["force_stages"]),
        progress=config["progress"],
    )
    record = write_run_record(result, run_dir) if run_dir is not None else None
    print("\n".join(summary_lines(result, record)), flush=True)
    failed = result.failed_checks()
    if failed:  # after the artifacts and run.json are written, so the numbers stay inspectable (and cached)
        raise PipelineError("accuracy check failed: " + "; ".join(failed))
    return result


@hydra.main(version_base="1.3", config_path=RECIPES_DIR, config_name="pipeline")
def hydra_main(cfg: DictConfig) -> None:
    try:
        run_recipe(cfg, Path(HydraConfig.get().runtime.output_dir))
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


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


def main() -> None:
    global _PLAN_ONLY
    if len(sys.argv) > 1 and sys.argv[1] == "validate":
        raise SystemExit(validate_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "plan":
        _PLAN_ONLY = True
        del sys.argv[1]
    hydra_main()


if __name__ == "__main__":
    main()
