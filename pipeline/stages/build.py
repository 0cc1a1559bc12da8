"""The build stage: a TensorRT-LLM checkpoint artifact -> an engine directory for the chosen backend."""

from __future__ import annotations

from typing import Any

from pipeline.engine.backends import get_backend
from pipeline.executor import StageContext, stage

STAGE_VERSION = 1


def backend_environment(stage_config: dict[str, Any]) -> Any:
    """What a backend's engines depend on beyond the checkpoint and the build config (TensorRT or TensorRT-LLM
    version, target GPU, exporter versions), so that it is part of the cache key; none for the cpu backend."""
    environment = getattr(get_backend(stage_config["build"]["backend"]), "environment", None)
    return environment(stage_config["build"]) if environment else None


# Options of one backend, left out of the build's config (and key) when at their defaults, so that adding them kept
# every existing engine's key.
BACKEND_OPTION_DEFAULTS = {"trtllm_args": [], "tensorrt_compute_capability": None}


def _build_view(stage_config: dict[str, Any]) -> dict[str, Any]:
    build = {k: v for k, v in stage_config["build"].items()
             if not (k in BACKEND_OPTION_DEFAULTS and v == BACKEND_OPTION_DEFAULTS[k])}
    return {**stage_config, "build": build}


@stage("build", version=STAGE_VERSION, reads=("build",), needs=("convert",), fingerprint=backend_environment,
       view=_build_view)
def build_stage(ctx: StageContext) -> dict[str, Any]:
    build = ctx.config["build"]
    metrics = get_backend(build["backend"]).build(ctx.inputs["convert"], ctx.out_dir, build)
    if build.get("smoke_test_tokens", 0) > 0:
        from pipeline.runtime.launch import smoke_test

        metrics.update(smoke_test(ctx.out_dir, build["smoke_test_tokens"]))
    return metrics
