"""Check an existing TensorRT-LLM checkpoint directory: config.json against the schema, and every rank file
against what the config implies (tensor names, shapes, dtypes, count per rank)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from pipeline.checkpoint.layout import plan
from pipeline.checkpoint.safetensors_stream import SAFETENSORS_DTYPES
from pipeline.errors import PipelineError
from pipeline.schemas import schema_errors


def validate_checkpoint(directory: Path) -> list[str]:
    """All problems found, as lines; an empty list means the checkpoint is consistent."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        return [f"{config_path}: missing"]
    try:
        cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        return [f"{config_path}: not valid JSON ({e})"]
    return check_against_config(directory, cfg)


def check_against_config(directory: Path, cfg: dict) -> list[str]:
    """The problems of a checkpoint directory's rank files (and of `cfg`, its config) as lines."""
    from pipeline.convert.registry import get_spec

    config_path = directory / "config.json"
    if not isinstance(cfg.get("mapping"), dict) or not isinstance(cfg.get("architecture"), str):
        return [f"{config_path}: 'architecture' and 'mapping' are required"]
    problems = [f"{config_path}: {e}" for e in schema_errors(cfg, "checkpoint_config")]
    if problems:
        return problems
    try:
        spec = get_spec(cfg["architecture"])
        plans = plan(cfg, spec.layout)
    except PipelineError as e:
        return [f"{config_path}: {e}"]
    expected_files = {f"rank{p.rank}.safetensors" for p in plans}
    extra = sorted(f.name for f in directory.glob("rank*.safetensors") if f.name not in expected_files)
    problems += [f"{directory / name}: not expected for world_size={len(plans)}" for name in extra]
    for p in plans:
        problems += _check_rank_file(directory / f"rank{p.rank}.safetensors", p)
    return problems


def _check_rank_file(path: Path, rank_plan) -> list[str]:
    if not path.is_file():
        return [f"{path}: missing"]
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:
        return [f"{path}: not a readable safetensors file ({e})"]
    want = {t.name: t for t in rank_plan.tensors}
    have = set(f.keys())
    problems = [f"{path}: missing tensor {n}" for n in sorted(set(want) - have)]
    problems += [f"{path}: unexpected tensor {n}" for n in sorted(have - set(want))]
    for name in sorted(have & set(want)):
        sl = f.get_slice(name)
        shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
        planned = want[name]
        if shape != planned.shape:
            problems.append(f"{path}: tensor {name} has shape {shape}, expected {planned.shape}")
        if dtype != SAFETENSORS_DTYPES[planned.dtype]:
            problems.append(f"{path}: tensor {name} has dtype {dtype}, expected {SAFETENSORS_DTYPES[planned.dtype]}")
    return problems
