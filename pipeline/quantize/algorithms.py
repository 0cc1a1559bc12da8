"""Calibration-driven weight transforms: SmoothQuant smoothing, AWQ scale search and GPTQ rounding.

Each works on the whole weight of one linear layer (or on several layers that read the same input, concatenated
along the output dim) and on that input's calibration statistics (`InputStats`). The Hessian H = sum over tokens of
x x^T makes every output-error estimate exact on the calibration set: for a weight error dW, the summed squared
output error is trace(dW H dW^T). So AWQ's grid search needs no activation samples, only H.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from pipeline.errors import PipelineError
from pipeline.quantize.numerics import fake_quant_per_group, int_range


@dataclass
class InputStats:
    """Statistics of one linear input over the calibration tokens (input dim `in`)."""

    absmax: torch.Tensor  # (in,) max |x_c|
    absmean: torch.Tensor  # (in,) mean |x_c|
    hessian: torch.Tensor | None  # (in, in) sum of x x^T (float32), when the algorithm needs it
    tokens: int
    output_absmax: float = 0.0  # max |y| of the layer's output (the fused qkv output for INT8 KV-cache scales)
    # What is derived from these statistics, computed once for every layer that reads this input: GPTQ's damped
    # inverse factor, the AWQ/SmoothQuant pre-quant factor (from them and the weights of every layer reading it).
    derived: dict = field(default_factory=dict, repr=False, compare=False)


def smoothquant_scales(weight: torch.Tensor, stats: InputStats, alpha: float) -> torch.Tensor:
    """SmoothQuant: s_c = max|x_c|^alpha / max|W_:,c|^(1 - alpha), clamped >= 1e-5; activations are divided by s
    (the checkpoint's prequant factor is 1 / s) and weight columns multiplied by it."""
    w_max = weight.abs().amax(dim=0).clamp(min=1e-5)
    x_max = stats.absmax.clamp(min=1e-5)
    return (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """Summed squared output error over the calibration tokens of a weight error delta (out, in)."""
    return float(((delta.float() @ hessian.float()) * delta.float()).sum(dtype=torch.float64))


def hessian_factor(hessian: torch.Tensor) -> torch.Tensor | None:
    """L (float32, lower triangular) with L L^T = H, for factored_output_error; None where H is singular (a channel
    the calibration never activated), whose error then takes output_error."""
    factor, info = torch.linalg.cholesky_ex(hessian.double())
    return factor.float() if int(info) == 0 else None


def factored_output_error(delta: torch.Tensor, factor: torch.Tensor, blocks: int = 8) -> float:
    """output_error through H = L L^T: trace(delta H delta^T) = ||delta L||^2. L is lower triangular, so column
    block J of delta L needs only delta's columns from J's first on: (blocks + 1) / (2 blocks) of the multiply-adds
    of output_error's product (0.56 with 8 blocks). Equal up to float32 rounding."""
    n = factor.shape[0]
    edges = [n * i // blocks for i in range(blocks + 1)]
    total = 0.0
    for start, end in zip(edges, edges[1:]):
        part = delta[:, start:] @ factor[start:, start:end]
        total += float((part * part).sum(dtype=torch.float64))
    return total


def awq_scales(weight: torch.Tensor, stats: InputStats, group_size: int, grid: int, scale_dtype: torch.dtype,
               what: str, search: str = "full") -> torch.Tensor:
    """AWQ's activation-aware scale search: s = mean|x|^alpha (normalised by sqrt(max * min)) for alpha on a grid
    i / grid in [0, 1); the alpha whose int4 group quantization of W * s (activations divided by s) gives the least
    output error on the calibration set wins (the lowest i among equal errors). Returns s (in,); alpha = 0 (s = 1,
    plain group quantization) is a candidate, so the result is never worse than no scaling on the calibration data.

    search="full" evaluates every grid point. "coarse_to_fine" evaluates the even points, then the odd neighbours
    of the two best of them: 13 of 20 points on average, the same choice as full unless the least error is an odd
    point beside neither of the two best even ones (SmolLM2: the same choice on all 120 inputs; refining around the
    best even point alone differed on one, at 0.5% more error)."""
    if stats.hessian is None:
        raise PipelineError(f"{what}: AWQ needs Hessian statistics; the calibration artifact has none")
    x_mean = stats.absmean.float().clamp(min=1e-4)
    weight = weight.float()
    hessian = stats.hessian.float()
    factor = hessian_factor(hessian)

    def scales(i: int) -> torch.Tensor:
        s = x_mean.pow(i / grid)
        s = s / (s.max() * s.min()).sqrt()
        return s.to(scale_dtype).float()  # the stored prequant factor is 1 / s in the model dtype

    def error(i: int) -> float:
        s = scales(i)
        quantized = fake_quant_per_group(weight * s, 4, group_size, scale_dtype, what)
        delta = quantized.div_(s).sub_(weight)
        return output_error(delta, hessian) if factor is None else factored_output_error(delta, factor)

    return scales(grid_search(grid, search, error))


def grid_search(grid: int, search: str, error: Callable[[int], float]) -> int:
    """The grid point i in [0, grid) of least error(i) (the lowest i among equal errors) over the points `search`
    evaluates: all of them ("full"), or the even ones and then the odd neighbours of the two best even ones
    ("coarse_to_fine")."""
    if search not in ("full", "coarse_to_fine"):
        raise PipelineError(f"quantization.awq_search={search!r}; expected full or coarse_to_fine")
    errors = {i: error(i) for i in range(0, grid, 1 if search == "full" else 2)}
    # a curve with two near-equal dips is refined at both
    for even in sorted(errors, key=lambda i: (errors[i], i))[:2]:
        for i in (even - 1, even + 1):
            if 0 <= i < grid and i not in errors:
                errors[i] = error(i)
    return min(errors, key=lambda i: (errors[i], i))


def gptq_quantize(weight: torch.Tensor, stats: InputStats, bits: int, group_size: int, damp: float,
                  scale_dtype: torch.dtype, what: str, block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al.): quantize columns left to right, each column's rounding error spread onto the columns
    not yet quantized through the inverse Hessian's Cholesky factor; asymmetric per (row, group) grids chosen when
    a group's first column is reached (AutoGPTQ's default without act-order). Returns q (out, in) as signed int8
    values (unsigned grid value - 2^(bits-1)), scale and zero (out, in / group_size) with w ~ q * scale + zero."""
    if stats.hessian is None:
        raise PipelineError(f"{what}: GPTQ needs Hessian statistics; the calibration artifact has none")
    rows, cols = weight.shape
    if cols % group_size:
        raise PipelineError(f"{what}: input width {cols} is not a multiple of quantization.group_size={group_size}")
    if ("gptq", damp) not in stats.derived:
        stats.derived["gptq", damp] = _damped_inverse_factor(stats.hessian, damp, what)
    hinv, dead = stats.derived["gptq", damp]
    w = weight.to(torch.float64, copy=True)
    w[:, dead] = 0.0
    umax = (1 << bits) - 1
    groups = cols // group_size
    # Work on W^T so that a column of W is one contiguous row: the per-column updates below touch contiguous memory.
    wt = w.t().contiguous()
    q_u = torch.empty(cols, rows, dtype=torch.float64)
    scale = torch.empty(groups, rows, dtype=torch.float64)
    zero = torch.empty(groups, rows, dtype=torch.float64)
    columns = _gptq_columns_kernel()
    for start in range(0, cols, block):
        end = min(start + block, cols)
        wb = wt[start:end]  # updated in place; columns from `end` on get this block's errors in one GEMM below
        errs = torch.empty(end - start, rows, dtype=torch.float64)
        hb = hinv[start:end, start:end].contiguous()
        # the block's columns in runs that share a group (a group's grid is chosen when its first column is reached)
        a = start
        while a < end:
            g = a // group_size
            b = min(end, (g + 1) * group_size)
            if a % group_size == 0:
                # the group's columns as they stand now: updated within this block, not yet beyond it
                scale[g], zero[g] = _asymmetric_grid(wt[a:a + group_size].t(), umax, scale_dtype)
            columns(wb, hb, q_u[start:end], errs, scale[g], zero[g], a - start, b - start, umax)
            a = b
        wt[end:] -= hinv[start:end, end:].t() @ errs
    q_u = q_u.t().to(torch.int16)
    scale, zero = scale.t(), zero.t()
    offset = 1 << (bits - 1)
    q_signed = (q_u - offset).to(torch.int8)
    # w ~ (q_u - z) * s = (q_u - offset) * s + (offset - z) * s
    zero_value = (offset - zero) * scale
    return q_signed, scale.float(), zero_value.float()


def _damped_inverse_factor(hessian: torch.Tensor, damp: float, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's inverse factor of the damped Hessian (float64) and the mask of dead input channels (never activated
    on the calibration set: their diagonal entry is set to 1, and their weights to 0)."""
    h = hessian.to(torch.float64, copy=True)
    diagonal = h.diagonal()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    diagonal += damp * diagonal.mean()  # H + damp * mean(diag H) * I, without forming I
    try:
        return inverse_upper_factor(h), dead
    except torch.linalg.LinAlgError as e:
        raise PipelineError(f"{what}: the calibration Hessian is not positive definite even with damping "
                            f"{damp} ({e}); raise quantization.gptq_damp or calibrate on more tokens") from None


def inverse_upper_factor(h: torch.Tensor) -> torch.Tensor:
    """U, upper triangular with a positive diagonal, with U^T U = H^-1: what GPTQ's textbook form computes as
    cholesky(cholesky_inverse(cholesky(H)), upper=True), from one Cholesky factorization and one triangular inverse.
    With J the order reversal, J H J = L L^T gives H = V V^T for the upper triangular V = J L J, so
    H^-1 = V^-T V^-1 and U = V^-1 (the factor is unique). Half the float64 arithmetic of the textbook form (~155 ->
    ~80 ms at 1536 columns); equal to it up to rounding (~4e-16 relative)."""
    lower = torch.linalg.cholesky(h.flip(0, 1))
    return _upper_triangular_inverse(lower.flip(0, 1))


def _upper_triangular_inverse(v: torch.Tensor, leaf: int = 128) -> torch.Tensor:
    """The inverse of an upper triangular matrix by halves: [[A, B], [0, D]]^-1 = [[A^-1, -A^-1 B D^-1], [0, D^-1]]
    (2/3 n^3 flops, where a triangular solve against the identity takes n^3)."""
    n = v.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(v, torch.eye(n, dtype=v.dtype), upper=True)
    half = n // 2
    a_inv = _upper_triangular_inverse(v[:half, :half], leaf)
    d_inv = _upper_triangular_inverse(v[half:, half:], leaf)
    out = torch.empty_like(v)
    out[:half, :half] = a_inv
    out[half:, half:] = d_inv
    out[:half, half:] = -(a_inv @ v[:half, half:]) @ d_inv
    out[half:, :half] = 0.0
    return out


def _gptq_columns_python(wb: torch.Tensor, hb: torch.Tensor, q: torch.Tensor, errs: torch.Tensor, s: torch.Tensor,
                         z: torch.Tensor, j0: int, j1: int, umax: int) -> None:
    """GPTQ's column loop over block columns [j0, j1) of one group (rows of wb): each column rounded on the group's
    grid, its error divided by the inverse factor's diagonal and spread onto the block's later columns."""
    for j in range(j0, j1):
        x = wb[j]
        qc = torch.clamp(torch.round(x / s) + z, 0, umax)
        q[j] = qc
        err = (x - (qc - z) * s) / hb[j, j]
        wb[j + 1:] -= hb[j, j + 1:].unsqueeze(1) * err
        errs[j] = err


def _gptq_columns_kernel():
    """The compiled column loop (pipeline.runtime.native's gptq_columns: the same float64 operations, bit for bit,
    without ten torch calls per column) where the compiled kernels are available, else the Python loop."""
    from pipeline.runtime.native import load

    kernels = load()
    return kernels.gptq_columns if kernels is not None else _gptq_columns_python


def _asymmetric_grid(w: torch.Tensor, umax: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row min/max grid including 0: scale = (max - min) / umax (rounded to the stored dtype), integer zero."""
    lo = torch.clamp(w.amin(dim=1), max=0)
    hi = torch.clamp(w.amax(dim=1), min=0)
    flat = (hi - lo) == 0
    lo, hi = torch.where(flat, -torch.ones_like(lo), lo), torch.where(flat, torch.ones_like(hi), hi)
    s = ((hi - lo) / umax).to(scale_dtype).double()
    z = torch.round(-lo / s)
    return s, z


__all__ = ["InputStats", "awq_scales", "factored_output_error", "gptq_quantize", "grid_search", "hessian_factor",
           "int_range", "output_error", "smoothquant_scales"]
