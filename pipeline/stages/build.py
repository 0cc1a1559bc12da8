"""The build stage: a TensorRT-LLM checkpoint artifact -> an engine directory for the chosen backend."""

from __future__ import annotations

import re
from typing import Any

from pipeline.convert.canonical import Dims
from pipeline.engine import backends
from pipeline.engine.backends import get_backend
from pipeline.errors import PipelineError
from pipeline.executor import Estimate, StageContext, stage

STAGE_VERSION = 1
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def backend_environment(stage_config: dict[str, Any]) -> Any:
    """What a backend's engines depend on beyond the checkpoint and the build config (TensorRT or TensorRT-LLM
    version, target GPU, exporter versions), so that it is part of the cache key; none for the cpu backend."""
    return backends.backend_environment(stage_config["build"]["backend"], stage_config["build"])


# Options of one backend, left out of the build's config (and key) when at their defaults, so that adding them kept
# every existing engine's key.
BACKEND_OPTION_DEFAULTS = {"trtllm_args": [], "tensorrt_compute_capability": None}


def _build_view(stage_config: dict[str, Any]) -> dict[str, Any]:
    build = {k: v for k, v in stage_config["build"].items()
             if not (k in BACKEND_OPTION_DEFAULTS and v == BACKEND_OPTION_DEFAULTS[k])}
    return {**stage_config, "build": build}


def parse_bytes(value: Any, key: str) -> int:
    """"2GiB", "512MB", "1.5 GB" or a number of bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise PipelineError(f"{key}={value!r} is not a size; expected e.g. 2GiB, 512MB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def engine_memory(ckpt: dict[str, Any], weight_bytes: int, limits: dict[str, Any]) -> tuple[int, int]:
    """(weights, KV cache) bytes an engine of all ranks holds at run time for these limits."""
    dims = Dims.from_config(ckpt)
    tp = ckpt["mapping"]["tp_size"]
    kv_heads = max(dims.kv_heads, tp)  # duplicated when tp exceeds them
    kv_bytes = 1 if (ckpt.get("quantization") or {}).get("kv_cache_quant_algo") else _ELEMENT_BYTES.get(ckpt["dtype"], 4)
    kv = 2 * dims.layers * limits["max_batch_size"] * limits["max_seq_len"] * kv_heads * dims.head_size * kv_bytes
    return weight_bytes, kv


def build_preflight(cfg: dict[str, Any], facts: dict[str, Any]) -> Estimate | None:
    """The backend's own checks of the limits against the checkpoint the convert stage will write, and the
    engine's memory against build.max_memory."""
    build = cfg["build"]
    backend = get_backend(build["backend"])
    ckpt = facts.get("checkpoint_config")
    if ckpt is None:
        return None
    check = getattr(backend, "preflight", None)
    limits = check(ckpt, build) if check is not None else None
    weights = facts.get("checkpoint_bytes", 0)
    if limits is None:
        return Estimate(disk_bytes=weights, what="engine")
    weights, kv = engine_memory(ckpt, weights, limits)
    if build.get("max_memory") is not None:
        allowed = parse_bytes(build["max_memory"], "build.max_memory")
        if weights + kv > allowed:
            raise PipelineError(
                f"build.max_memory={build['max_memory']} ({allowed / (1 << 20):.1f} MiB) is less than the engine "
                f"needs: {(weights + kv) / (1 << 20):.1f} MiB = weights {weights / (1 << 20):.1f} MiB + KV cache "
                f"{kv / (1 << 20):.1f} MiB (max_batch_size={limits['max_batch_size']} x "
                f"max_seq_len={limits['max_seq_len']}); lower those limits or raise build.max_memory")
    return Estimate(disk_bytes=weights, memory_bytes=weights + kv, what="engine")


@stage("build", version=STAGE_VERSION, reads=("build",), needs=("convert",), fingerprint=backend_environment,
       view=_build_view, preflight=build_preflight)
def build_stage(ctx: StageContext) -> dict[str, Any]:
    build = ctx.config["build"]
    metrics = get_backend(build["backend"]).build(ctx.inputs["convert"], ctx.out_dir, build)
    if build.get("smoke_test_tokens", 0) > 0:
        from pipeline.run import smoke_test

        metrics.update(smoke_test(ctx.out_dir, build["smoke_test_tokens"]))
    return metrics
