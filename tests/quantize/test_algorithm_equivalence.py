"""The fast forms of the calibration statistics, the AWQ search and GPTQ compute what the plain definitions compute."""

from __future__ import annotations

import pytest
import torch

from pipeline.quantize.algorithms import (InputStats, _asymmetric_grid, awq_scales, factored_output_error, gptq_quantize,
                                         grid_search, hessian_factor, inverse_upper_factor, output_error)
from pipeline.errors import PipelineError
from pipeline.quantize.calibrate import _Accumulator
from pipeline.quantize.numerics import group_view, symmetric_per_group
from pipeline.quantize.stats import pack_lower, unpack_symmetric


def _stats(cols: int, seed: int = 0) -> tuple[torch.Tensor, InputStats]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, cols, generator=g) * (torch.rand(cols, generator=g) * 3) ** 2
    h = (x.double().t() @ x.double()).float()
    return x, InputStats(absmax=x.abs().amax(0), absmean=x.abs().mean(0), hessian=h, tokens=x.shape[0])


@pytest.mark.parametrize("cols", [70, 3, 577])
def test_hessian_lower_blocks_equal_the_full_product(cols):
    x, _ = _stats(cols)
    acc = _Accumulator(cols, hessian=True)
    for part in x.split(100):
        acc.add(part, part[:, :3])
    packed = acc.tensors("m")["m.hessian"]
    assert packed.shape == (cols * (cols + 1) // 2,)  # the lower triangle only
    h = unpack_symmetric(packed, "m")
    ref = x.double().t() @ x.double()
    assert torch.equal(h, h.t())
    assert torch.allclose(h.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # the float32 mirror holds the values of mirroring the float64 lower triangle before rounding
    lower = acc.hessian.tril()
    assert torch.equal(h, (lower + lower.tril(-1).t()).float())
    # whatever the upper triangle holds (a diagonal block's GEMM may leave other last bits there), the lower one wins
    acc.hessian += torch.rand(cols, cols, dtype=torch.float64).triu(1)
    assert torch.equal(acc.tensors("m")["m.hessian"], packed)


def test_packed_hessian_round_trip_and_errors():
    h = torch.randn(7, 7)
    h = h + h.t()
    packed = pack_lower(h)
    assert packed.tolist() == [float(h[i, j]) for i in range(7) for j in range(i + 1)]
    assert torch.equal(unpack_symmetric(packed, "m"), h)
    with pytest.raises(PipelineError, match=r"layer_0.safetensors: m.hessian: expected the lower triangle .* \(27,\)"):
        unpack_symmetric(torch.zeros(27), "layer_0.safetensors: m.hessian")


def _awq_reference_candidates(weight, stats, group_size, grid):
    """(error, s) for every grid point, as the plain definition computes them."""
    out = []
    x_mean = stats.absmean.float().clamp(min=1e-4)
    for i in range(grid):
        s = x_mean.pow(i / grid)
        s = (s / (s.max() * s.min()).sqrt()).float()
        q, scale = symmetric_per_group(weight * s, 4, group_size, torch.float32)
        deq = (group_view(q.float(), group_size, "w") * scale.unsqueeze(-1)).reshape(weight.shape) / s
        out.append((output_error(deq - weight, stats.hessian), s))
    return out


def _awq_reference(weight, stats, group_size, grid):
    candidates = _awq_reference_candidates(weight, stats, group_size, grid)
    return candidates[min(range(grid), key=lambda i: (candidates[i][0], i))][1]


def test_factored_error_equals_the_full_product():
    """||dW L||^2 over the triangular blocks equals trace(dW H dW^T), for widths that do and do not split evenly."""
    for cols, blocks in ((96, 8), (70, 8), (45, 1), (64, 3)):
        _, stats = _stats(cols, seed=cols)
        delta = torch.randn(33, cols, generator=torch.Generator().manual_seed(3)) * 1e-3
        factor = hessian_factor(stats.hessian)
        assert torch.equal(factor, factor.tril())
        expected = output_error(delta, stats.hessian)
        assert abs(factored_output_error(delta, factor, blocks) - expected) <= 1e-5 * expected


def test_singular_hessian_has_no_factor():
    _, stats = _stats(16)
    h = stats.hessian.clone()
    h[3], h[:, 3] = 0.0, 0.0  # a channel the calibration never activated
    assert hessian_factor(h) is None
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)) * 0.05
    dead = InputStats(absmax=stats.absmax, absmean=stats.absmean, hessian=h, tokens=stats.tokens)
    assert awq_scales(w, dead, 8, 10, torch.float32, "w").shape == (16,)  # the full product decides instead


def test_awq_search_equals_the_plain_loop():
    _, stats = _stats(96)
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(1)) * 0.05
    assert torch.equal(awq_scales(w, stats, 32, 20, torch.float32, "w"), _awq_reference(w, stats, 32, 20))


def test_coarse_to_fine_awq_search_takes_the_best_even_points_or_their_neighbours():
    """coarse_to_fine's choice is the least error among the even points and the neighbours of the two best even
    points (errors from the plain definition), and equals the full search where the curve has no third dip."""
    agreed = 0
    for seed in range(6):
        _, stats = _stats(96, seed=seed)
        w = torch.randn(40, 96, generator=torch.Generator().manual_seed(seed + 1)) * 0.05
        for grid in (20, 7):
            errors = [e for e, _ in _awq_reference_candidates(w, stats, 32, grid)]
            evens = sorted(range(0, grid, 2), key=lambda i: (errors[i], i))[:2]
            looked = set(range(0, grid, 2)) | {i for e in evens for i in (e - 1, e + 1) if 0 <= i < grid}
            expected = min(looked, key=lambda i: (errors[i], i))
            got = awq_scales(w, stats, 32, grid, torch.float32, "w", "coarse_to_fine")
            assert torch.equal(got, _awq_reference_candidates(w, stats, 32, grid)[expected][1]), (seed, grid)
            agreed += torch.equal(got, _awq_reference(w, stats, 32, grid))
    assert agreed >= 10  # these curves dip once: the two searches agree on (nearly) all of them


def _counted(curve):
    asked = []

    def error(i):
        asked.append(i)
        return curve[i]

    return error, asked


def test_grid_search_refines_around_the_two_best_even_points():
    # two dips: the least error (index 9) is beside the second-best even point (8), not the best (4)
    curve = [9, 8, 7, 6, 2.0, 2.5, 5, 4, 2.2, 1.0, 6, 7]
    error, asked = _counted(curve)
    assert grid_search(len(curve), "coarse_to_fine", error) == 9
    assert sorted(asked) == [0, 2, 3, 4, 5, 6, 7, 8, 9, 10] and len(asked) == len(set(asked))
    error, asked = _counted(curve)
    assert grid_search(len(curve), "full", error) == 9 and sorted(asked) == list(range(len(curve)))
    # a lower dip beside neither of the two best even points is not seen: the documented limit of coarse_to_fine
    curve = [5, 0.5, 4, 6, 1.0, 6, 1.1, 6, 8]
    assert grid_search(len(curve), "coarse_to_fine", _counted(curve)[0]) == 4
    assert grid_search(len(curve), "full", _counted(curve)[0]) == 1


def test_grid_search_breaks_ties_by_the_lowest_point_and_takes_odd_grids():
    assert grid_search(5, "coarse_to_fine", lambda i: [3, 1, 2, 1, 3][i]) == 1
    assert grid_search(1, "coarse_to_fine", lambda i: 0.0) == 0
    assert grid_search(2, "coarse_to_fine", lambda i: [1.0, 0.5][i]) == 1


def _gptq_reference(weight, stats, bits, group_size, damp, block):
    """Column by column in the (out, in) layout, as the GPTQ paper writes it (lazy batches of `block` columns)."""
    rows, cols = weight.shape
    w, h = weight.double().clone(), stats.hessian.double().clone()
    h += torch.eye(cols, dtype=h.dtype) * damp * torch.diag(h).mean()
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    umax = (1 << bits) - 1
    q = torch.zeros(rows, cols, dtype=torch.int16)
    scale = torch.zeros(rows, cols // group_size, dtype=torch.float64)
    zero = torch.zeros_like(scale)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        wb, errs, hb = w[:, start:end].clone(), torch.zeros(rows, end - start, dtype=torch.float64), hinv[start:end, start:end]
        for j in range(end - start):
            col, g = start + j, (start + j) // group_size
            if col % group_size == 0:
                scale[:, g], zero[:, g] = _asymmetric_grid(torch.cat([wb[:, j:], w[:, end:]], 1)[:, :group_size],
                                                           umax, torch.float32)
            s, z = scale[:, g], zero[:, g]
            qc = torch.clamp(torch.round(wb[:, j] / s) + z, 0, umax)
            q[:, col] = qc.to(torch.int16)
            err = (wb[:, j] - (qc - z) * s) / hb[j, j]
            wb[:, j:] -= err.unsqueeze(1) * hb[j, j:].unsqueeze(0)
            errs[:, j] = err
        w[:, end:] -= errs @ hinv[start:end, end:]
    offset = 1 << (bits - 1)
    return (q - offset).to(torch.int8), scale.float(), ((offset - zero) * scale).float()


def test_inverse_upper_factor_equals_the_textbook_form():
    """One Cholesky and a triangular inverse by halves give cholesky(cholesky_inverse(cholesky(H)), upper=True), at
    widths below, at and across the halving's leaf size; a matrix that is not positive definite still raises."""
    import pytest

    for cols in (1, 5, 127, 128, 129, 300, 577):
        x, _ = _stats(cols, seed=cols)
        h = x.double().t() @ x.double()
        h += torch.eye(cols, dtype=h.dtype) * 0.01 * torch.diag(h).mean()
        want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
        got = inverse_upper_factor(h)
        assert torch.equal(got, got.triu()) and bool((torch.diag(got) > 0).all())
        assert (got - want).abs().max().item() <= 1e-12 * want.abs().max().item(), cols
    with pytest.raises(torch.linalg.LinAlgError):
        inverse_upper_factor(-torch.eye(4, dtype=torch.float64))


def test_gptq_equals_the_column_by_column_reference():
    _, stats = _stats(96, seed=2)
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(3)) * 0.05
    # groups of 32 inside blocks of 64, and groups of 48 that straddle a block boundary (48 -> 64)
    for group_size, block in ((32, 64), (48, 64)):
        got = gptq_quantize(w, stats, 4, group_size, 0.01, torch.float32, "w", block=block)
        ref = _gptq_reference(w, stats, 4, group_size, 0.01, block)
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


def test_gptq_compiled_column_loop_equals_the_python_loop(monkeypatch):
    """The compiled column loop computes the Python loop's float64 operations bit for bit: groups inside blocks,
    groups straddling blocks and larger than a block, int4 and int8, every scale dtype, a ragged last block."""
    import pytest

    from pipeline.quantize import algorithms
    from pipeline.runtime import native

    if native.load() is None:
        pytest.skip("the compiled kernels are not available here")
    _, stats = _stats(192, seed=4)
    w = torch.randn(37, 192, generator=torch.Generator().manual_seed(5)) * 0.05
    for bits, group_size, block, dtype in ((4, 32, 64, torch.float16), (4, 48, 64, torch.bfloat16),
                                           (8, 96, 64, torch.float32), (4, 64, 128, torch.float16)):
        compiled = gptq_quantize(w, stats, bits, group_size, 0.01, dtype, "w", block=block)
        with monkeypatch.context() as m:
            m.setattr(algorithms, "_gptq_columns_kernel", lambda: algorithms._gptq_columns_python)
            python = gptq_quantize(w, stats, bits, group_size, 0.01, dtype, "w", block=block)
        for a, b in zip(compiled, python):
            assert torch.equal(a, b)
