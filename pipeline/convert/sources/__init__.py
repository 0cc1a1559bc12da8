"""Model sources: each opens one on-disk format and presents HF-named tensors, read lazily, plus an HF config dict.

Sources are chosen by the recipe's `model.source` key through the SOURCES registry, never by path names.
"""

from __future__ import annotations

import copy
import importlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from pipeline.convert.sources.base import SourceModel
from pipeline.errors import PipelineError

SOURCES: dict[str, Callable[[Path], SourceModel]] = {}


def register_source(name: str):
    def deco(cls):
        SOURCES[name] = cls
        return cls

    return deco


# Recently opened sources, keyed by kind, path and the files' sizes and mtimes: a run opens its source for
# fingerprints, checks before work, calibration and conversion; parsing a large GGUF header once is enough.
_OPENED: "OrderedDict[tuple, SourceModel]" = OrderedDict()
_KEEP_OPEN = 2


class _Shared:
    """A cached source handed out to one caller: `close()` leaves it open for the next (evicted sources close)."""

    def __init__(self, inner: SourceModel):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def close(self) -> None:
        pass


def _signature(path: Path) -> tuple:
    try:
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    except OSError:
        return ()


def open_source(kind: str, path: Path) -> SourceModel:
    # Import the built-in sources so they register themselves.
    from pipeline.convert.sources import gguf, hf, jax, modelopt, trtllm  # noqa: F401
    from pipeline.convert.sources import deepspeed, megatron, nemo  # noqa: F401

    from pipeline.convert.sources.gptq import with_prequantized

    if kind not in SOURCES:
        raise PipelineError(f"model.source={kind!r} is not a known source; known: {sorted(SOURCES)}")
    path = Path(path)
    key = (kind, str(path.resolve()), _signature(path))
    if key in _OPENED:
        _OPENED.move_to_end(key)
        return _Shared(_OPENED[key])  # type: ignore[return-value]
    source = with_prequantized(SOURCES[kind](path))
    _OPENED[key] = source
    while len(_OPENED) > _KEEP_OPEN:
        _OPENED.popitem(last=False)[1].close()
    return _Shared(source)  # type: ignore[return-value]


# Source kind -> "module:function" computing, from the path alone, the same fingerprint as the opened source's
# `fingerprint()`: headers and small files only, no tensor library imported. Deciding that a run's stages are all
# cached costs milliseconds this way (opening a GGUF source parses its whole vocabulary). Kinds not listed are opened.
PATH_FINGERPRINTS = {
    "gguf": "pipeline.convert.sources.gguf_header:gguf_fingerprint",
    "hf": "pipeline.convert.sources.hf:hf_fingerprint",
}


# Source kinds that can hold already-quantized weights (a `quantized` attribute: a TensorRT-LLM or ModelOpt
# checkpoint keeps its stored scales). Other kinds are not opened to ask, so deciding whether a quantized recipe
# needs calibration costs no tensor-library import.
QUANTIZED_KINDS = ("modelopt", "trtllm")


def source_is_quantized(kind: str, path: Path) -> bool:
    """Whether the source holds quantized weights it keeps (scales and all); kinds that cannot are not opened."""
    return kind in QUANTIZED_KINDS and _source_has(kind, path, "quantized")


def source_is_prequantized(kind: str, path: Path) -> bool:
    """Whether the source holds GPTQ integers (any kind: the GPTQ view is chosen from the source's config)."""
    return _source_has(kind, path, "prequantized")


def _source_has(kind: str, path: Path, attribute: str) -> bool:
    source = open_source(kind, path)
    try:
        return bool(getattr(source, attribute, False))
    finally:
        source.close()


# Path fingerprints computed in this process (several stages key on the same source), by kind, path and each
# top-level file's size, mtime, ctime and inode (ctime moves on every write, even one that restores the mtime).
_FINGERPRINTS: dict[tuple, dict[str, Any]] = {}


def _stat_signature(path: Path) -> tuple:
    try:
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        stats = [(p.name, p.stat()) for p in files]
    except OSError:
        return ()
    return tuple((name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for name, st in stats)


def source_fingerprint(kind: str, path: Path) -> dict[str, Any]:
    """The identity of a source's files for the cache key (see `SourceModel.fingerprint`)."""
    path = Path(path)
    if kind in PATH_FINGERPRINTS:
        memo = (kind, str(path.resolve()), _stat_signature(path))
        if memo not in _FINGERPRINTS:
            module, function = PATH_FINGERPRINTS[kind].split(":")
            try:
                _FINGERPRINTS[memo] = getattr(importlib.import_module(module), function)(path)
            except (PipelineError, OSError, ValueError):
                return _opened_fingerprint(kind, path)  # not one it can read: opening it names the problem
        return copy.deepcopy(_FINGERPRINTS[memo])
    return _opened_fingerprint(kind, path)


def _opened_fingerprint(kind: str, path: Path) -> dict[str, Any]:
    source = open_source(kind, path)
    try:
        return source.fingerprint()
    finally:
        source.close()
