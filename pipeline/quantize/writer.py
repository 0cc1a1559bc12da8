"""Computes the quantized tensors of one checkpoint target at a time for the converter's streaming writer.

The converter walks the rank plan; when a planned tensor belongs to a quantized linear, `TargetQuantizer.whole`
returns that scheme tensor for the whole (unsplit) layer, computing all of the layer's scheme tensors once when its
first one is asked for. AWQ and SmoothQuant factors are computed per *input* (qkv; fc and gate together), so layers
that read the same activations share one factor, as TensorRT-LLM's fused kernels need.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from pipeline.checkpoint.layout import PlannedTensor, Target
from pipeline.convert.canonical import Canon
from pipeline.errors import PipelineError
from pipeline.quantize.schemes import (KEEPS_SOURCE_INTEGERS, KV_SCALE, Scheme, Settings, kv_cache_scale,
                                       quantized_linear, stats_key)
from pipeline.quantize.stats import StatsReader

ReadParts = Callable[[tuple[Canon, ...], "int | None"], list[torch.Tensor]]
# Integers, scales and zeros of pre-quantized source weights (GPTQ checkpoints), or None for float sources.
ReadPrequantized = Callable[[tuple[Canon, ...], "int | None"], "list | None"]


def _local_module(module: str) -> tuple[str, str]:
    """'transformer.layers.3.mlp.fc' -> ('transformer.layers.3.', 'mlp.fc'); 'lm_head' -> ('', 'lm_head')."""
    parts = module.split(".")
    if len(parts) > 3 and parts[0] == "transformer" and parts[1] == "layers":
        return ".".join(parts[:3]) + ".", ".".join(parts[3:])
    return "", module


class TargetQuantizer:
    def __init__(self, scheme: Scheme | None, settings: Settings, stats: StatsReader | None, read_parts: ReadParts,
                 targets: list[Target], exclude_modules: list[str] | None, kv_algo: str | None,
                 read_prequantized: ReadPrequantized | None = None):
        self.scheme, self.settings, self.stats = scheme, settings, stats
        self.read_parts, self.targets = read_parts, targets
        self.read_prequantized = read_prequantized
        self.exclude_modules = exclude_modules
        self.kv_algo = kv_algo
        self._key: tuple | None = None
        self._tensors: dict[str, Any] = {}
        self._input_stats: dict[tuple, Any] = {}

    def whole(self, planned: PlannedTensor) -> list[torch.Tensor]:
        """The whole tensor(s) of a planned scheme tensor: one per part for ROWS tensors, else one."""
        if planned.quant is KV_SCALE:
            return [self._kv_scale(planned.layer)]
        key = (planned.layer, planned.module)
        if key != self._key:
            self._tensors = self._quantize(planned)
            self._key = key
        value = self._tensors[planned.quant.suffix]
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def _stats(self, layer: int | None, module: str):
        """The statistics of the input this module reads: one object for every module reading it (consecutive
        targets), so that what is derived from them (`InputStats.derived`) is computed once."""
        if self.stats is None:
            return None
        _, local = _local_module(module)
        key = (layer, stats_key(local))
        if key not in self._input_stats:
            self._input_stats = {key: self.stats.input(layer, key[1], hessian=self.scheme.stats == "hessian")}
        return self._input_stats[key]

    def _quantize(self, planned: PlannedTensor) -> dict[str, Any]:
        if self.scheme.algo in KEEPS_SOURCE_INTEGERS and self.read_prequantized is not None:
            pre = self.read_prequantized(planned.canons, planned.layer)
            if pre is not None:
                return self._source_integers(pre, planned.module)
        parts = [p.float() for p in self.read_parts(planned.canons, planned.layer)]
        stats = self._stats(planned.layer, planned.module)
        prequant = self._prequant(planned, stats) if self.scheme.smooth else None
        return self.scheme.quantize(parts, prequant, stats, self.settings, planned.module)

    def _source_integers(self, pre: list, module: str) -> dict[str, Any]:
        """A GPTQ source's own integers, scales and zeros: nothing is rounded again."""
        bits = KEEPS_SOURCE_INTEGERS[self.scheme.algo]
        for p in pre:
            if p.bits != bits or p.group_size != self.settings.group_size:
                raise PipelineError(
                    f"{module}: the source is GPTQ with bits={p.bits}, group_size={p.group_size}; "
                    f"quant_algo={self.scheme.algo} with quantization.group_size={self.settings.group_size} would "
                    f"re-quantize it (set quantization.group_size={p.group_size}"
                    + (")" if p.bits == bits else f", quant_algo={'W4A16_GPTQ' if p.bits == 4 else 'W8A16_GPTQ'})"))
        return {"weight": [p.q for p in pre], "weights_scaling_factor": [p.scale.to(self.settings.dtype) for p in pre],
                "zero": [p.zero.to(self.settings.dtype) for p in pre]}

    def _prequant(self, planned: PlannedTensor, stats) -> torch.Tensor:
        """1 / s of the input this module reads, in the model dtype, computed once for every module reading it (kept
        with the input's statistics)."""
        if "prequant" not in stats.derived:
            prefix, local = _local_module(planned.module)
            input_key = stats_key(local)
            weights = torch.cat([p.float() for t in self._sharing(planned, prefix, input_key)
                                 for p in self.read_parts(t.parts, planned.layer)], dim=0)
            s = self.scheme.smooth(weights, stats, self.settings, f"{prefix}{input_key}")
            stats.derived["prequant"] = (1.0 / s).to(self.settings.dtype).float()
        return stats.derived["prequant"]

    def _sharing(self, planned: PlannedTensor, prefix: str, input_key: str) -> list[Target]:
        """The quantized linear targets of this layer that read the same input."""
        found = []
        for t in self.targets:
            name = t.name.format(layer=prefix.split(".")[2] if prefix else 0)
            module = quantized_linear(name, self.exclude_modules)
            if module is None:
                continue
            where, local = _local_module(module)
            if where == prefix and stats_key(local) == input_key:
                found.append(t)
        if not found:
            raise PipelineError(f"{planned.module}: no quantized layer reads input {input_key}")
        return found

    def _kv_scale(self, layer: int) -> torch.Tensor:
        if self.stats is None:
            raise PipelineError("KV-cache quantization needs calibration statistics")
        qkv = self.stats.input(layer, "attention.qkv", hessian=False)
        prefix = f"transformer.layers.{layer}.attention"
        return kv_cache_scale(self.kv_algo, qkv, self.stats.scalar(layer, f"{prefix}.k_absmax"),
                              self.stats.scalar(layer, f"{prefix}.v_absmax"))
