"""The convert stage: a source model (HF directory or GGUF file) -> a TensorRT-LLM checkpoint artifact."""

from __future__ import annotations

import logging
import resource
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.convert.sources import open_source, source_is_prequantized, source_is_quantized
from pipeline.convert.sources import source_fingerprint as _fingerprint
from pipeline.convert.sources.locate import resolve_model_path
from pipeline.executor import Estimate, StageContext, stage

if TYPE_CHECKING:
    from pipeline.convert.registry import MappingArgs

# The converter, the quantization schemes and torch are imported by the functions that convert or check; the key
# functions (fingerprint, view, optional needs) import none of them for an unquantized recipe, so a run whose stages
# are all cached never loads torch.

log = logging.getLogger(__name__)

STAGE_VERSION = 4  # 2: the tokenizer is saved beside the checkpoint (tokenizer/); 3: quantization;
# 4: Phi-3 MLP fused as [up; gate] with long_rope, MPT and ALiBi GPT layouts


def source_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    model = config["model"]
    return _fingerprint(model["source"], resolve_model_path(model["path"], model["package"]))


def save_tokenizer(source, out: Path) -> bool:
    """Keep the tokenizer with the checkpoint (TensorRT-LLM ignores extra files), so engines built from it can
    encode and decode text on their own."""
    tokenizer = source.tokenizer()
    if tokenizer is None:
        log.warning("the source carries no tokenizer; engines built from this checkpoint need --tokenizer_dir for text")
        return False
    tokenizer.save_pretrained(out)
    return True


# Converter-only keys, and the algorithms that read them.
_ALGORITHM_KEYS = {"gptq_damp": "GPTQ", "gptq_sm": "GPTQ", "awq_grid": "AWQ", "awq_search": "AWQ"}


def convert_view(config: dict[str, Any]) -> dict[str, Any]:
    """Key the quantization group by what the checkpoint depends on: the `quantization` object the algorithm
    writes plus the converter keys it reads. Other keys (smoothquant_val under AWQ, group_size under FP8, the
    calibration settings, which reach the key through the calibrate stage's key) do not invalidate its checkpoints."""
    q = config["quantization"]
    if q.get("quant_algo"):
        from pipeline.quantize.schemes import quant_config

        keyed = quant_config(q)
    else:  # what quant_config gives without an algorithm, without importing the schemes (and torch)
        keyed = {"quant_algo": q.get("quant_algo"), "kv_cache_quant_algo": q.get("kv_cache_quant_algo")}
    algo = q.get("quant_algo") or ""
    keyed.update({k: q[k] for k, family in _ALGORITHM_KEYS.items() if family in algo and k in q})
    return {**config, "quantization": keyed}


def needs_calibration(config: dict[str, Any]) -> bool:
    q = config.get("quantization") or {}
    if not q.get("quant_algo") and not q.get("kv_cache_quant_algo"):
        return False  # nothing to calibrate
    from pipeline.quantize.schemes import needs_statistics

    model = config["model"]
    path = resolve_model_path(model["path"], model["package"])
    need = needs_statistics(q, lambda: source_is_prequantized(model["source"], path))
    # A quantized TensorRT-LLM checkpoint keeps its stored scales (a different algorithm is refused by convert).
    return need != "none" and not source_is_quantized(model["source"], path)


def mapping_args(m: dict[str, Any]) -> MappingArgs:
    from pipeline.convert.registry import MappingArgs

    return MappingArgs(m["tp_size"], m["pp_size"], m["use_parallel_embedding"], m["embedding_sharding_dim"],
                       m.get("moe_tp_size"), m.get("moe_ep_size"))


def convert_preflight(cfg: dict[str, Any], facts: dict[str, Any]) -> Estimate:
    """Everything the conversion will check, from the source's config and tensor shapes: mapping, shapes, dtypes,
    quantization group sizes. Records the checkpoint config for the build stage's checks."""
    from pipeline.convert.converter import prepare

    model = cfg["model"]
    source = open_source(model["source"], resolve_model_path(model["path"], model["package"]))
    try:
        prepared = prepare(source, cfg["dtype"], mapping_args(cfg["mapping"]), model["architecture"],
                           cfg["quantization"])
    finally:
        source.close()
    facts["checkpoint_config"] = prepared.config
    facts["checkpoint_bytes"] = prepared.bytes
    return Estimate(disk_bytes=prepared.bytes, what="checkpoint")


@stage(
    "convert",
    version=STAGE_VERSION,
    reads=("model", "dtype", "mapping", "quantization"),
    fingerprint=source_fingerprint,
    unkeyed=("model.path", "model.package"),
    view=convert_view,
    optional_needs=(("calibrate", needs_calibration),),
    preflight=convert_preflight,
)
def convert_stage(ctx: StageContext) -> dict[str, Any]:
    from pipeline.convert.converter import convert

    cfg = ctx.config
    model, m = cfg["model"], cfg["mapping"]
    mapping = mapping_args(m)
    source = open_source(model["source"], resolve_model_path(model["path"], model["package"]))
    try:
        result = convert(source, ctx.out_dir, cfg["dtype"], mapping, model["architecture"], ctx.progress,
                         quantization=cfg["quantization"], stats_dir=ctx.inputs.get("calibrate"),
                         check_finite=model.get("check_finite", True))
        has_tokenizer = save_tokenizer(source, ctx.out_dir / "tokenizer")
    finally:
        source.close()
    return {
        "architecture": result.config["architecture"],
        "world_size": mapping.tp_size * mapping.pp_size,
        "tensors": sum(len(v) for v in result.written.values()),
        "bytes": result.bytes_written,
        "tokenizer": has_tokenizer,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
