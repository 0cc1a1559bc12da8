"""A preallocated KV cache with one update method."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values of one layer, [max_batch, kv_heads, max_seq, head_size]; KV heads are never repeated here."""

    def __init__(self, max_batch: int, kv_heads: int, max_seq: int, head_size: int, dtype: torch.dtype):
        super().__init__()
        shape = (max_batch, kv_heads, max_seq, head_size)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Write k, v ([B, kv_heads, T, D]) at each sequence's positions input_pos ([B, T]); return this batch's
        keys and values for cache positions [0, kv_len)."""
        b = k.shape[0]
        rows = torch.arange(b, device=input_pos.device).unsqueeze(1).expand_as(input_pos)
        # Advanced indices on dims 0 and 2 put the indexed dims first: the values are laid out [B, T, heads, D].
        self.k[rows, :, input_pos] = k.transpose(1, 2)
        self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k[:b, :, :kv_len], self.v[:b, :, :kv_len]
