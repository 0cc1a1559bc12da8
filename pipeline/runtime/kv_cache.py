"""A preallocated KV cache with one update method."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros whose pages become resident only when written: numpy allocates large zero arrays with calloc, which
    maps untouched pages to the shared zero page. A cache sized for the build limits then costs memory in proportion
    to what requests use. (Zeros, not garbage: masked slots still enter attention with weight 0, and 0 * NaN is NaN.)"""
    same_size = {2: np.int16, 4: np.float32, 1: np.int8}[torch.empty((), dtype=dtype).element_size()]
    return torch.from_numpy(np.zeros(shape, dtype=same_size)).view(dtype)


class KVCache(nn.Module):
    """Keys and values of one layer, [max_batch, kv_heads, max_seq, head_size]; KV heads are never repeated here."""

    def __init__(self, max_batch: int, kv_heads: int, max_seq: int, head_size: int, dtype: torch.dtype):
        super().__init__()
        shape = (max_batch, kv_heads, max_seq, head_size)
        self.register_buffer("k", lazy_zeros(shape, dtype), persistent=False)
        self.register_buffer("v", lazy_zeros(shape, dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Write k, v ([B, kv_heads, T, D]) at each sequence's positions input_pos ([B, T]); return this batch's
        keys and values for cache positions [0, kv_len)."""
        b = k.shape[0]
        rows = torch.arange(b, device=input_pos.device).unsqueeze(1).expand_as(input_pos)
        # Advanced indices on dims 0 and 2 put the indexed dims first: the values are laid out [B, T, heads, D].
        self.k[rows, :, input_pos] = k.transpose(1, 2)
        self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k[:b, :, :kv_len], self.v[:b, :, :kv_len]
