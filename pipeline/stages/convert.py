"""The convert stage: a source model (HF directory or GGUF file) -> a TensorRT-LLM checkpoint artifact."""

from __future__ import annotations

import logging
import resource
from pathlib import Path
from typing import Any

from pipeline.convert.converter import convert
from pipeline.convert.registry import MappingArgs
from pipeline.convert.sources import open_source
from pipeline.convert.sources.locate import resolve_model_path
from pipeline.errors import PipelineError
from pipeline.executor import StageContext, stage

log = logging.getLogger(__name__)

STAGE_VERSION = 2  # 2: the tokenizer is saved beside the checkpoint (tokenizer/)


def source_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    model = config["model"]
    source = open_source(model["source"], resolve_model_path(model["path"], model["package"]))
    try:
        return source.fingerprint()
    finally:
        source.close()


def save_tokenizer(source, out: Path) -> bool:
    """Keep the tokenizer with the checkpoint (TensorRT-LLM ignores extra files), so engines built from it can
    encode and decode text on their own."""
    tokenizer = source.tokenizer()
    if tokenizer is None:
        log.warning("the source carries no tokenizer; engines built from this checkpoint need --tokenizer_dir for text")
        return False
    tokenizer.save_pretrained(out)
    return True


@stage(
    "convert",
    version=STAGE_VERSION,
    reads=("model", "dtype", "mapping", "quantization"),
    fingerprint=source_fingerprint,
    unkeyed=("model.path", "model.package"),
)
def convert_stage(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.config
    quant = cfg["quantization"]
    if quant.get("quant_algo") or quant.get("kv_cache_quant_algo"):
        raise PipelineError(
            f"quantization.quant_algo={quant.get('quant_algo')} / kv_cache_quant_algo={quant.get('kv_cache_quant_algo')}: "
            "quantized conversion is not implemented in this version; use quantization=none"
        )
    model, m = cfg["model"], cfg["mapping"]
    mapping = MappingArgs(m["tp_size"], m["pp_size"], m["use_parallel_embedding"], m["embedding_sharding_dim"])
    source = open_source(model["source"], resolve_model_path(model["path"], model["package"]))
    try:
        result = convert(source, ctx.out_dir, cfg["dtype"], mapping, model["architecture"], ctx.progress)
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
