"""Engine backends, chosen by `build.backend`. A backend builds an engine directory from a checkpoint; the runtime
loads what it built. Callers use `get_backend(name)` only, so a new backend (e.g. TensorRT) is one more entry."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import PipelineError

BACKEND_MODULES = {"cpu": "pipeline.engine.cpu", "onnx": "pipeline.engine.onnx_backend",
                   "tensorrt": "pipeline.engine.tensorrt_backend", "trtllm": "pipeline.engine.trtllm_backend"}
# Backends without an `environment` hook (their engines depend on the checkpoint, the build config and this package
# alone): their build key is computed without importing them, so deciding that a cpu build is cached loads no torch.
NO_ENVIRONMENT = frozenset({"cpu"})


class Backend(Protocol):
    name: str

    def build(self, checkpoint_dir: Path, engine_dir: Path, build_config: dict[str, Any]) -> dict[str, Any]:
        """Write the engine directory; return metrics."""


def get_backend(name: str) -> Backend:
    if name not in BACKEND_MODULES:
        raise PipelineError(
            f"build.backend={name!r} is not available in this version; available: {sorted(BACKEND_MODULES)}"
        )
    return importlib.import_module(BACKEND_MODULES[name]).BACKEND


def backend_environment(name: str, build_config: dict[str, Any]) -> Any:
    """What the backend's engines depend on beyond the checkpoint and the build config (its `environment` hook:
    TensorRT or TensorRT-LLM version, target GPU, exporter versions), or None."""
    if name in NO_ENVIRONMENT:
        return None
    environment = getattr(get_backend(name), "environment", None)
    return environment(build_config) if environment else None
