"""Perplexity from context logits over fixed windows of a text."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where logits are scored: building a request's windows needs no torch
    import torch


def windows(ids: list[int], length: int, max_windows: int) -> list[list[int]]:
    """Consecutive non-overlapping windows of `length` tokens (the last partial one kept if >= 2 tokens)."""
    out = [ids[i: i + length] for i in range(0, len(ids), length)]
    return [w for w in out if len(w) >= 2][:max_windows]


def nll_sum(logits: torch.Tensor, ids: list[int]) -> tuple[float, int]:
    """Sum of -log p(token_t | tokens_<t) over t = 1..T-1, from logits [T, V] of the window."""
    import torch

    target = torch.tensor(ids[1:])
    logprobs = torch.log_softmax(logits[: len(ids) - 1].double(), dim=-1)
    return float(-logprobs[torch.arange(len(target)), target].sum()), len(target)


def perplexity(total_nll: float, total_tokens: int) -> float:
    return math.exp(total_nll / total_tokens)
