"""Checkpoint quantized linears -> the CPU engine's one quantized form.

Whatever the algorithm, an engine linear `N` is stored as integer or FP8 values `N` (int8 (out, in); int4 packed two
per byte along the input dim, (out, in / 2) uint8; or float8_e4m3fn (out, in)) with `N.scale` (out, groups) float32,
optionally `N.zero` (out, groups) (w = q * scale + zero), `N.prequant` (in,) (activations are multiplied by it first)
and `N.act_scale` (1,) (activations are quantized with it: INT8 or FP8 per the engine's `act_quant`). Reading a
checkpoint module means undoing its storage format, never re-rounding: the engine computes with exactly the values
TensorRT-LLM would load (except W8A16/W4A16, whose float checkpoint weights are quantized here as TensorRT-LLM's
build does, per rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from pipeline.errors import PipelineError
from pipeline.quantize.numerics import pack_int4_cols, symmetric_per_channel, unpack_int4_cols, unpack_int4_rows


@dataclass
class EngineQuant:
    q: torch.Tensor  # (out, in) int8 values (int4 in [-8, 7]) or float8_e4m3fn
    scale: torch.Tensor  # (out, groups) float32
    bits: int  # 8 or 4 (integers), 0 for FP8 values
    zero: torch.Tensor | None = None
    prequant: torch.Tensor | None = None
    act_scale: torch.Tensor | None = None

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The engine file's tensors for the runtime parameter `name`."""
        out = {name: pack_int4_cols(self.q).view(torch.uint8) if self.bits == 4 else self.q,
               f"{name}.scale": self.scale.float().contiguous()}
        for suffix, t in (("zero", self.zero), ("prequant", self.prequant), ("act_scale", self.act_scale)):
            if t is not None:
                out[f"{name}.{suffix}"] = t.float().contiguous()
        return out


def from_engine_tensors(q: torch.Tensor, extras: Mapping[str, torch.Tensor]) -> EngineQuant:
    """Inverse of EngineQuant.tensors (extras keyed by suffix)."""
    bits = 4 if q.dtype == torch.uint8 else 8 if q.dtype == torch.int8 else 0
    return EngineQuant(unpack_int4_cols(q.view(torch.int8)) if bits == 4 else q, extras["scale"], bits,
                       extras.get("zero"), extras.get("prequant"), extras.get("act_scale"))


# (the module's checkpoint tensors by suffix, the GPU generation GPTQ weights are laid out for) -> engine form
Reader = Callable[[Mapping[str, torch.Tensor], int], EngineQuant]


def _weight_only(bits: int) -> Reader:
    def read(t: Mapping[str, torch.Tensor], gptq_sm: int) -> EngineQuant:
        # TensorRT-LLM's build-time rule: per output channel of this rank's slice, scale = amax / 2^(bits-1).
        q, scale = symmetric_per_channel(t["weight"].float(), bits, float(1 << (bits - 1)))
        return EngineQuant(q, scale.unsqueeze(1), bits)

    return read


def _awq(t: Mapping[str, torch.Tensor], gptq_sm: int) -> EngineQuant:
    return EngineQuant(unpack_int4_rows(t["weight"]), t["weights_scaling_factor"].float(), 4,
                       prequant=t["prequant_scaling_factor"].float().reshape(-1),
                       act_scale=t["activation_scaling_factor"].float().reshape(1)
                       if "activation_scaling_factor" in t else None)


def _gptq(bits: int) -> Reader:
    def read(t: Mapping[str, torch.Tensor], gptq_sm: int) -> EngineQuant:
        from pipeline.quantize.mixed_gemm import unpreprocess_weights_for_mixed_gemm

        q = unpreprocess_weights_for_mixed_gemm(t["weight"], bits, gptq_sm).t().contiguous()
        return EngineQuant(q, t["weights_scaling_factor"].float().t().contiguous(), bits,
                           zero=t["zero"].float().t().contiguous())

    return read


def _smoothquant(t: Mapping[str, torch.Tensor], gptq_sm: int) -> EngineQuant:
    return EngineQuant(t["weight"], t["weights_scaling_factor"].float().reshape(-1, 1), 8,
                       prequant=t["prequant_scaling_factor"].float().reshape(-1),
                       act_scale=t["activation_scaling_factor"].float().reshape(1))


def _fp8(t: Mapping[str, torch.Tensor], gptq_sm: int) -> EngineQuant:
    w = t["weight"]
    if w.dtype == torch.int8:  # int8 bytes of the same bits are accepted by TensorRT-LLM too
        w = w.view(torch.float8_e4m3fn)
    return EngineQuant(w, t["weights_scaling_factor"].float().reshape(1, 1).expand(w.shape[0], 1).contiguous(), 0,
                       act_scale=t["activation_scaling_factor"].float().reshape(1))


@dataclass(frozen=True)
class CheckpointFormat:
    """How the cpu build reads one algorithm's quantized modules."""

    suffixes: tuple[str, ...]  # the checkpoint tensors of a module it reads
    read: Reader
    act_quant: str | None = None  # activation quantization the algorithm implies ("int8", "fp8")


_AWQ = ("weight", "weights_scaling_factor", "prequant_scaling_factor")
_GPTQ = ("weight", "weights_scaling_factor", "zero")
FORMATS: dict[str, CheckpointFormat] = {
    "W8A16": CheckpointFormat(("weight",), _weight_only(8)),
    "W4A16": CheckpointFormat(("weight",), _weight_only(4)),
    "W4A16_AWQ": CheckpointFormat(_AWQ, _awq),
    "W4A8_AWQ": CheckpointFormat(_AWQ + ("weights_scaling_factor_2", "activation_scaling_factor"), _awq, "fp8"),
    "W4A16_GPTQ": CheckpointFormat(_GPTQ, _gptq(4)),
    "W8A16_GPTQ": CheckpointFormat(_GPTQ, _gptq(8)),
    "W8A8_SQ_PER_CHANNEL": CheckpointFormat(("weight", "weights_scaling_factor", "activation_scaling_factor",
                                             "prequant_scaling_factor"), _smoothquant, "int8"),
    "FP8": CheckpointFormat(("weight", "weights_scaling_factor", "activation_scaling_factor"), _fp8, "fp8"),
}


def fuse(parts: list[EngineQuant], what: str) -> EngineQuant:
    """Several checkpoint linears concatenated along the output dim (fc and gate): they must share what applies to
    their common input (prequant factor); activation scales are the largest (equal when calibrated together).
    Works on meta tensors too (the build declares engine shapes that way before computing anything)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if first.prequant is not None and not first.prequant.is_meta \
            and not all(torch.equal(p.prequant, first.prequant) for p in parts):
        raise PipelineError(f"{what}: the fused layers have different prequant_scaling_factor tensors; the CPU "
                            "engine fuses them into one GEMM and needs one (ModelOpt writes them shared)")
    if len({p.scale.shape[1] for p in parts}) > 1 or len({p.bits for p in parts}) > 1:
        raise PipelineError(f"{what}: the fused layers are quantized differently")
    cat = lambda xs: None if xs[0] is None else torch.cat(xs, dim=0)  # noqa: E731
    act = None if first.act_scale is None else torch.stack([p.act_scale for p in parts]).amax(dim=0)
    return EngineQuant(torch.cat([p.q.view(torch.uint8) if p.bits == 0 else p.q for p in parts]).view(first.q.dtype),
                       cat([p.scale for p in parts]), first.bits, cat([p.zero for p in parts]), first.prequant, act)
