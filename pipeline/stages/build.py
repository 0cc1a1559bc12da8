"""The build stage: a TensorRT-LLM checkpoint artifact -> an engine directory for the chosen backend."""

from __future__ import annotations

from typing import Any

from pipeline.engine.backends import get_backend
from pipeline.executor import StageContext, stage

STAGE_VERSION = 1


@stage("build", version=STAGE_VERSION, reads=("build",), needs=("convert",))
def build_stage(ctx: StageContext) -> dict[str, Any]:
    build = ctx.config["build"]
    metrics = get_backend(build["backend"]).build(ctx.inputs["convert"], ctx.out_dir, build)
    if build.get("smoke_test_tokens", 0) > 0:
        from pipeline.runtime.launch import smoke_test

        metrics.update(smoke_test(ctx.out_dir, build["smoke_test_tokens"]))
    return metrics
