"""The calibrate stage: calibration statistics of the source model, an artifact of their own.

Its key covers the source model, the calibration settings and whether Hessians are collected, but not the
quantization algorithm: a sweep over algorithms that need the same statistics computes them once. It runs only when
the recipe's algorithms need statistics (the convert stage's optional upstream).
"""

from __future__ import annotations

from typing import Any

from pipeline.convert.sources import open_source
from pipeline.convert.sources.locate import resolve_model_path
from pipeline.executor import StageContext, stage
from pipeline.quantize.schemes import needs_statistics
from pipeline.stages.convert import source_fingerprint

STAGE_VERSION = 1


def calibration_view(config: dict[str, Any]) -> dict[str, Any]:
    """What the stage's result depends on: the model, the calibration settings, and whether Hessians are needed."""
    q = config["quantization"]
    return {"model": config["model"], "calibration": q["calibration"],
            "hessian": needs_statistics(q) == "hessian"}


def calibrate_preflight(cfg: dict[str, Any], facts: dict[str, Any]) -> None:
    """The calibration set exists and has text in its field, before any stage starts."""
    from pipeline.quantize.calibrate import calibration_texts  # torch: imported only when there is work

    calibration_texts(cfg["calibration"])


@stage("calibrate", version=STAGE_VERSION, reads=("model", "quantization"), view=calibration_view,
       fingerprint=source_fingerprint, unkeyed=("model.path", "model.package"), preflight=calibrate_preflight)
def calibrate_stage(ctx: StageContext) -> dict[str, Any]:
    from pipeline.quantize.calibrate import calibrate

    cfg = ctx.config
    model = cfg["model"]
    source = open_source(model["source"], resolve_model_path(model["path"], model["package"]))
    try:
        return calibrate(source, ctx.out_dir, cfg["calibration"], cfg["hessian"], model["architecture"], ctx.progress)
    finally:
        source.close()
