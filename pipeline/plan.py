"""The preflight plan of a run (`trtllm-pipeline plan <overrides>`, or `dry_run=true` on any run): what the run
would write and need, computed before any work from the source's headers and the checkpoint plan alone.

- per rank file: tensor count, bytes, the largest tensor;
- the expected peak RSS of convert: a model of the streaming writer, `base + factor x the largest whole target (in
  float32 MiB)` (`CONVERT_RSS_MODEL`): the writer holds one target, its cast and its rank pieces at a time.
  The constants were fitted with `/usr/bin/time` on this project's machines (CPython 3.11, torch 2.13 CPU) on three
  model sizes; `benchmarks/plan_accuracy.py` re-measures them (see docs/ARCHITECTURE.md, Memory);
- the disk the cache needs: the checkpoint's bytes, an engine of about the same size, small files for the others,
  for every stage that is not reused;
- which stages would be reused from the cache (same keys as the executor computes).

`check_disk` fails before anything is written when the need exceeds the free space of the cache's filesystem,
naming both numbers. The executor and the CLI call into this module; it runs no stage.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

MIB = 1 << 20
# Peak RSS of convert = base (interpreter, torch, transformers, this package) + per-target factor x largest target,
# per source kind (a TensorRT-LLM checkpoint source also holds the gathered rank pieces while it reassembles).
CONVERT_RSS_MODEL = {"default": (295.0, 2.5), "trtllm": (309.0, 3.4)}
# Stages whose artifact is small next to the checkpoint (statistics, reports): a fixed allowance each (the reference
# adds its stored distributions: reference_bytes).
SMALL_ARTIFACT_BYTES = {"calibrate": 64 * MIB, "evaluate": 16 * MIB, "reference": 16 * MIB}


def reference_bytes(config: dict[str, Any], vocab_size: int) -> int:
    """The reference artifact's size: its JSON allowance plus, with perplexity windows, the stored distributions
    (up to ppl_max_windows x (ppl_window - 1) positions)."""
    from pipeline.evaluate.request import has_ppl_windows
    from pipeline.evaluate.stats import stored_bytes_per_position

    ev = config["evaluate"]
    if not has_ppl_windows(ev):
        return SMALL_ARTIFACT_BYTES["reference"]
    form = str(getattr(ev["kl_reference"], "value", ev["kl_reference"]))
    positions = ev["ppl_max_windows"] * (ev["ppl_window"] - 1)
    return SMALL_ARTIFACT_BYTES["reference"] + positions * stored_bytes_per_position(form, vocab_size)


def convert_plan(config: dict[str, Any]) -> dict[str, Any]:
    """Per rank file counts and bytes, the largest tensor and target, and the convert peak RSS estimate."""
    from pipeline.convert.registry import MappingArgs
    from pipeline.convert.converter import prepare
    from pipeline.convert.sources import open_source
    from pipeline.convert.sources.locate import resolve_model_path
    from pipeline.convert.canonical import Dims, canonical_shape

    model, m = config["model"], config["mapping"]
    mapping = MappingArgs(m["tp_size"], m["pp_size"], m["use_parallel_embedding"], m["embedding_sharding_dim"],
                          m.get("moe_tp_size"), m.get("moe_ep_size"))
    source = open_source(model["source"], resolve_model_path(model["path"], model["package"]))
    try:
        prepared = prepare(source, config["dtype"], mapping, model["architecture"], config["quantization"])
        cfg, plans = prepared.config, prepared.plans
    finally:
        source.close()
    dims = Dims.from_config(cfg)
    ranks, largest_target = [], 0
    for p in plans:
        sizes = [(t.name, math.prod(t.shape) * _itemsize(t.dtype)) for t in p.tensors]
        biggest = max(sizes, key=lambda s: s[1])
        ranks.append({"file": f"rank{p.rank}.safetensors", "tensors": len(sizes), "bytes": sum(b for _, b in sizes),
                      "largest_tensor": {"name": biggest[0], "bytes": biggest[1]}})
        for t in p.tensors:
            whole = sum(math.prod(canonical_shape(c, dims)) for c in t.canons) * 4
            largest_target = max(largest_target, whole)
    total = sum(r["bytes"] for r in ranks)
    base, per_target = CONVERT_RSS_MODEL.get(model["source"], CONVERT_RSS_MODEL["default"])
    return {"architecture": cfg["architecture"], "dtype": cfg["dtype"], "mapping": cfg["mapping"],
            "quantization": cfg["quantization"], "vocab_size": cfg["vocab_size"], "ranks": ranks,
            "checkpoint_bytes": total,
            "largest_target_float32_bytes": largest_target,
            "convert_peak_rss_mib": round(base + per_target * largest_target / MIB, 1)}


def _itemsize(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def stage_keys(config: dict[str, Any], planned: list | None = None) -> list[tuple[str, str]]:
    """(stage, cache key) of every stage the run needs: the executor's own plan (`planned`, when the caller has
    it), so the keys cannot drift."""
    from pipeline.executor import plan_pipeline

    if planned is None:
        planned = plan_pipeline(config, list(config["stages"]))
    return [(p.spec.name, p.key) for p in planned]


def make_plan(config: dict[str, Any], planned: list | None = None) -> dict[str, Any]:
    """The whole plan of a run (the JSON written to plan.json)."""
    from pipeline.cache import ArtifactCache

    cache_root = Path(config["cache_dir"])
    cache = ArtifactCache(cache_root)
    forced = set(config["force_stages"]) if not config["force"] else None
    convert = convert_plan(config)
    stages, need = [], 0
    for name, key in stage_keys(config, planned):
        # the executor's own rule: a valid entry (manifest and files intact) that no force option recomputes
        reused = forced is not None and name not in forced and cache.is_valid(name, key)
        size = _artifact_bytes(name, config, convert)
        need += 0 if reused else size
        stages.append({"stage": name, "key": key, "reused": reused, "disk_bytes": 0 if reused else size})
    free = free_bytes(cache_root)
    return {"convert": convert, "stages": stages, "cache_dir": str(cache_root), "disk_need_bytes": need,
            "disk_free_bytes": free}


def _artifact_bytes(stage: str, config: dict[str, Any], convert: dict[str, Any]) -> int:
    if stage in ("convert", "build"):
        return convert["checkpoint_bytes"]
    if stage == "reference":
        return reference_bytes(config, convert["vocab_size"])
    return SMALL_ARTIFACT_BYTES.get(stage, 0)


def free_bytes(path: Path) -> int:
    """Free space of the filesystem that holds `path` (or would: its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk(plan: dict[str, Any]) -> None:
    need, free = plan["disk_need_bytes"], plan["disk_free_bytes"]
    if need > free:
        raise PipelineError(f"the run needs about {need / MIB:.1f} MiB in the cache ({plan['cache_dir']}), but its "
                            f"filesystem has {free / MIB:.1f} MiB free; free space or set cache_dir elsewhere")


def plan_lines(plan: dict[str, Any]) -> list[str]:
    c = plan["convert"]
    lines = [f"plan: {c['architecture']} {c['dtype']} tp{c['mapping']['tp_size']} pp{c['mapping']['pp_size']}"
             f" quant_algo={c['quantization'].get('quant_algo')}"]
    for r in c["ranks"]:
        lines.append(f"  {r['file']}: {r['tensors']} tensors, {r['bytes'] / MIB:.1f} MiB, largest "
                     f"{r['largest_tensor']['name']} ({r['largest_tensor']['bytes'] / MIB:.1f} MiB)")
    lines.append(f"  convert peak RSS (estimate): {c['convert_peak_rss_mib']:.0f} MiB")
    for s in plan["stages"]:
        lines.append(f"  stage {s['stage']}: {'reused from the cache' if s['reused'] else 'would run'}"
                     f" ({s['disk_bytes'] / MIB:.1f} MiB)")
    lines.append(f"  cache disk: {plan['disk_need_bytes'] / MIB:.1f} MiB needed, {plan['disk_free_bytes'] / MIB:.1f} "
                 "MiB free")
    return lines


def write_plan(plan: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "plan.json"
    path.write_text(json.dumps(plan, indent=2) + "\n")
    return path
