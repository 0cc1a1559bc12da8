"""Greedy selection: torch's argmax, bit for bit, on the path the decode loop takes (CPU float32 through numpy)."""

from __future__ import annotations

import torch

from pipeline.runtime.sampling import greedy, sample


def test_greedy_is_torchs_argmax():
    """First index of the maximum on ties, NaN counted as the maximum (its first occurrence), infinities, one row and
    eight, a non-contiguous view; int64 ids like torch's."""
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(1, 49152, generator=g), torch.randn(8, 49152, generator=g)]
    ties = torch.zeros(3, 100)
    ties[:, [7, 9, 40]] = 1.0
    nans = torch.randn(2, 100, generator=g)
    nans[0, [5, 60]] = float("nan")
    nans[1, 3] = float("inf")
    wide = torch.randn(100, 4, generator=g)
    cases += [ties, nans, torch.full((2, 10), -float("inf")), wide.T]  # wide.T: a non-contiguous view
    for logits in cases:
        got = greedy(logits)
        assert got.dtype == torch.int64 and torch.equal(got, logits.argmax(dim=-1)), logits.shape


def test_greedy_settings_take_the_greedy_path():
    logits = torch.randn(4, 50)
    for settings in [(1.0, 1, 0.0), (1.0, 0, 0.0), (0.0, 40, 0.9)]:
        assert torch.equal(sample(logits, *settings, None), logits.argmax(dim=-1))
