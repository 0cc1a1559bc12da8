"""The quantization arithmetic every algorithm shares: symmetric and asymmetric integer grids, FP8 casts, int4
packing. All functions take whole float tensors in the nn.Linear (out, in) orientation and never modify inputs."""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
INT8_MAX = 127.0


def int_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def symmetric_per_channel(w: torch.Tensor, bits: int, divisor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row: scale = amax / divisor, q = clamp(round(w / scale)); an all-zero row gets scale 0 and q 0
    (TensorRT-LLM's weight-only rule uses divisor 2^(bits-1); SmoothQuant's uses 127)."""
    lo, hi = int_range(bits)
    scale = w.abs().amax(dim=-1) / divisor
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(w / safe.unsqueeze(-1)), lo, hi)
    return q.to(torch.int8), scale


def group_view(w: torch.Tensor, group_size: int, what: str) -> torch.Tensor:
    """(out, in) -> (out, in / group_size, group_size)."""
    from pipeline.errors import PipelineError

    if w.shape[-1] % group_size:
        raise PipelineError(f"{what}: input width {w.shape[-1]} is not a multiple of quantization.group_size={group_size}")
    return w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)


def symmetric_per_group(w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype,
                        what: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ/ModelOpt rule: per (row, input group) scale = group amax / (2^(bits-1) - 1), zeros -> 1.0; the scale is
    rounded to its stored dtype first so the integers are exact for the stored scale. Returns q (out, in) int8
    and scale (out, in / group_size)."""
    q, scale = _per_group_grid(w, bits, group_size, scale_dtype, what)
    return q.reshape(w.shape).to(torch.int8), scale.squeeze(-1)


def fake_quant_per_group(w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype,
                         what: str = "weight") -> torch.Tensor:
    """What `symmetric_per_group` dequantizes to (q * scale), without the int8 round trip (AWQ's grid search)."""
    q, scale = _per_group_grid(w, bits, group_size, scale_dtype, what)
    return q.mul_(scale).reshape(w.shape)


def _per_group_grid(w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype,
                    what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rounded, clamped grid values (float, grouped) and the scales (out, groups, 1) of symmetric_per_group."""
    lo, hi = int_range(bits)
    g = group_view(w, group_size, what)
    scale = g.abs().amax(dim=-1, keepdim=True).div_(hi)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).to(scale_dtype).float()
    return g.div(scale).round_().clamp_(lo, hi), scale


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """w = q * scale (+ zero), with scale/zero (out, groups) broadcast over each group of q's input dim."""
    groups = scale.shape[-1]
    g = q.float().reshape(*q.shape[:-1], groups, q.shape[-1] // groups) * scale.float().unsqueeze(-1)
    if zero is not None:
        g = g + zero.float().unsqueeze(-1)
    return g.reshape(q.shape)


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn values of x / scale, saturated to +-448 (the cast alone would overflow to NaN)."""
    return torch.clamp(x.float() / scale.float(), -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What an FP8 GEMM sees of x: quantized with a per-tensor scale and dequantized, in x's dtype."""
    return (fp8_quantize(x, scale).to(torch.float32) * scale.float()).to(x.dtype)


def fake_quant_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What an INT8 GEMM sees of x: round(x / scale) clamped to [-128, 127], dequantized, in x's dtype."""
    return (torch.clamp(torch.round(x.float() / scale.float()), -128, 127) * scale.float()).to(x.dtype)


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """(out, in) int4 values -> (out / 2, in) int8: byte [r, k] = q[2r, k] in the low nibble, q[2r + 1, k] in the
    high nibble (ModelOpt's AWQ packing: pairs along the output dim)."""
    if q.is_meta:
        return _packed_meta((q.shape[0] // 2, *q.shape[1:]))
    lo, hi = q[0::2].to(torch.int16) & 0xF, q[1::2].to(torch.int16) & 0xF
    return ((hi << 4) | lo).to(torch.uint8).view(torch.int8)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4_rows: (out / 2, in) int8 -> (out, in) int8 values in [-8, 7]."""
    b = packed.view(torch.uint8).to(torch.int16)
    lo, hi = _signed_nibble(b & 0xF), _signed_nibble(b >> 4)
    return torch.stack([lo, hi], dim=1).reshape(packed.shape[0] * 2, *packed.shape[1:]).to(torch.int8)


def pack_int4_cols(q: torch.Tensor) -> torch.Tensor:
    """(rows, n) int4 values -> (rows, n / 2) int8, element 2k in the low nibble (pairs along the last dim)."""
    if q.is_meta:
        return _packed_meta((*q.shape[:-1], q.shape[-1] // 2))
    lo, hi = q[..., 0::2].to(torch.int16) & 0xF, q[..., 1::2].to(torch.int16) & 0xF
    return ((hi << 4) | lo).to(torch.uint8).view(torch.int8)


def _packed_meta(shape: tuple[int, ...]) -> torch.Tensor:
    """The packed tensor's shape alone, for the layout plan's meta tensors: torch's meta bitwise ops are Python
    registrations whose first call imports torch._dynamo (about 2 s of a run's start)."""
    return torch.empty(shape, dtype=torch.int8, device="meta")


def unpack_int4_cols(packed: torch.Tensor) -> torch.Tensor:
    b = packed.view(torch.uint8).to(torch.int16)
    lo, hi = _signed_nibble(b & 0xF), _signed_nibble(b >> 4)
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(torch.int8)


def _signed_nibble(n: torch.Tensor) -> torch.Tensor:
    return torch.where(n >= 8, n - 16, n)
