"""The calibration statistics artifact: `calibration.json` (what was run) and one safetensors file per decoder layer
(`layer_3.safetensors`, plus `head.safetensors` for the LM head's input), each with one group of tensors per linear
input named after the TensorRT-LLM module that reads it, with global layer indices
(`transformer.layers.3.attention.qkv.absmax`, `.absmean`, `.output_absmax`, `.hessian`), plus the layer's KV ranges
(`transformer.layers.3.attention.k_absmax`). Per-layer files keep both writing and reading to one layer in memory.

A Hessian is symmetric and stored as its lower triangle, row by row (n(n+1)/2 float32 values): half the bytes of the
square matrix (e.g. 200 instead of 400 MB for SmolLM2-135M, 11 instead of 22 GB for a 7B Llama). Artifacts that
stored the square matrix read as before."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pipeline.errors import PipelineError
from pipeline.quantize.algorithms import InputStats

META_FILE = "calibration.json"


def pack_lower(h: torch.Tensor) -> torch.Tensor:
    """The lower triangle of a square matrix (diagonal included), row by row."""
    rows, cols = torch.tril_indices(h.shape[0], h.shape[0])
    return h[rows, cols]


def unpack_symmetric(packed: torch.Tensor, where: str) -> torch.Tensor:
    """The symmetric matrix whose lower triangle `pack_lower` stored (a length that is no triangle is an error
    naming `where`)."""
    length = packed.numel()
    n = (math.isqrt(8 * length + 1) - 1) // 2
    if packed.dim() != 1 or n * (n + 1) // 2 != length:
        raise PipelineError(f"{where}: expected the lower triangle of a square matrix (n(n+1)/2 values), got shape "
                            f"{tuple(packed.shape)}")
    rows, cols = torch.tril_indices(n, n)
    h = torch.empty(n, n, dtype=packed.dtype)
    h[rows, cols] = packed
    h[cols, rows] = packed
    return h


def module_prefix(layer: int | None, key: str) -> str:
    return key if layer is None else f"transformer.layers.{layer}.{key}"


def stats_file(layer: int | None) -> str:
    return "head.safetensors" if layer is None else f"layer_{layer}.safetensors"


class StatsReader:
    """Reads one input's statistics at a time from a calibration artifact."""

    def __init__(self, artifact_dir: Path):
        self.dir = Path(artifact_dir)
        meta = self.dir / META_FILE
        if not meta.is_file():
            raise PipelineError(f"calibration statistics {meta} are missing")
        self.meta: dict[str, Any] = json.loads(meta.read_text())
        self._open: tuple[int | None, Any, set[str]] | None = None

    def _file(self, layer: int | None):
        if self._open is None or self._open[0] != layer:
            path = self.dir / stats_file(layer)
            if not path.is_file():
                raise PipelineError(f"calibration statistics {path} are missing (was it calibrated on this model?)")
            f = safe_open(str(path), framework="pt")
            self._open = (layer, f, set(f.keys()))
        return self._open[1], self._open[2]

    def input(self, layer: int | None, key: str, hessian: bool) -> InputStats:
        f, names = self._file(layer)
        prefix = module_prefix(layer, key)
        if f"{prefix}.absmax" not in names:
            raise PipelineError(f"{self.dir / stats_file(layer)} has no statistics for {prefix}")
        h = None
        if hessian:
            if f"{prefix}.hessian" not in names:
                raise PipelineError(f"{self.dir} has no Hessian for {prefix}: it was calibrated without Hessians "
                                    "(the algorithms that need them: AWQ, GPTQ)")
            h = f.get_tensor(f"{prefix}.hessian")
            if h.dim() == 1:
                h = unpack_symmetric(h, f"{self.dir / stats_file(layer)}: {prefix}.hessian")
        return InputStats(absmax=f.get_tensor(f"{prefix}.absmax"), absmean=f.get_tensor(f"{prefix}.absmean"),
                          hessian=h, tokens=int(self.meta.get("tokens", 0)),
                          output_absmax=float(f.get_tensor(f"{prefix}.output_absmax")))

    def scalar(self, layer: int, name: str) -> float:
        f, names = self._file(layer)
        if name not in names:
            raise PipelineError(f"{self.dir / stats_file(layer)} has no statistic {name}")
        return float(f.get_tensor(name))
