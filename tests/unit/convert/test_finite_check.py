"""The converter's one-pass finite check says what counting torch.isfinite's mask says."""

from __future__ import annotations

import pytest
import torch

from pipeline.convert.converter import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn])
@pytest.mark.parametrize("numel", [1, 7, 33, 1000, 4099])
def test_one_bad_value_anywhere_is_found(dtype, numel):
    base = (torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 3).to(dtype)
    assert all_finite(base)
    bad_values = [float("nan")] if dtype == torch.float8_e4m3fn else [float("nan"), float("inf"), -float("inf")]
    for value in bad_values:
        for at in sorted({0, numel // 2, numel - 1}):  # first, a middle lane and the scalar tail of a vector loop
            t = base.clone()
            t[at] = value
            assert not all_finite(t), (dtype, numel, value, at)
            assert not all_finite(t.view(1, -1).expand(3, -1))  # a non-contiguous view reads the same values


def test_empty_and_extreme_finite_tensors_pass():
    assert all_finite(torch.empty(0, 5))
    big = torch.full((64,), torch.finfo(torch.float32).max)
    assert all_finite(big) and all_finite(-big)  # a sum would overflow; min/max do not
