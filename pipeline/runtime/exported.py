"""The stage model of an exported engine, by its backend (`onnx`: onnxruntime; `tensorrt`: TensorRT on CUDA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.runtime.parallel import Dist


def load_graph_model(backend: str, engine_dir: Path, d: Dist, config: dict[str, Any]):
    if backend == "onnx":
        from pipeline.runtime.graph_model import OnnxStageModel

        return OnnxStageModel(engine_dir, d, config)
    if backend == "tensorrt":
        from pipeline.runtime.trt_model import TrtStageModel

        return TrtStageModel(engine_dir, d, config)
    raise PipelineError(f"{engine_dir}: engines of backend {backend!r} are not run by this runtime")
