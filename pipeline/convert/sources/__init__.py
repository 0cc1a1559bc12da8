"""Model sources: each opens one on-disk format and presents HF-named tensors, read lazily, plus an HF config dict.

Sources are chosen by the recipe's `model.source` key through the SOURCES registry, never by path names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.convert.sources.base import SourceModel
from pipeline.errors import PipelineError

SOURCES: dict[str, Callable[[Path], SourceModel]] = {}


def register_source(name: str):
    def deco(cls):
        SOURCES[name] = cls
        return cls

    return deco


def open_source(kind: str, path: Path) -> SourceModel:
    # Import the built-in sources so they register themselves.
    from pipeline.convert.sources import gguf, hf, jax, modelopt, trtllm  # noqa: F401

    from pipeline.convert.sources.gptq import with_prequantized

    if kind not in SOURCES:
        raise PipelineError(f"model.source={kind!r} is not a known source; known: {sorted(SOURCES)}")
    return with_prequantized(SOURCES[kind](Path(path)))
