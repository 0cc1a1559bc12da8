"""A preallocated KV cache with one update method."""

from __future__ import annotations

import math
import mmap

import numpy as np
import torch
from torch import nn


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros whose pages become resident only when written: an anonymous private mapping starts on the shared zero
    page. A cache sized for the build limits then costs memory in proportion to what requests use. (Zeros, not
    garbage: masked slots still enter attention with weight 0, and 0 * NaN is NaN.)

    The mapping is advised against transparent huge pages. With them (numpy's large zero arrays ask for them, and
    THP "always" gives them to any mapping), the first write into each 2 MiB of a cache makes the kernel zero a whole
    2 MiB page: a SmolLM2 decode step at batch 8 writes into ~1,400 of them, ~2.9 GB resident and ~5 s for the first
    step on a 2-core VM, against ~11 MB and ~10 ms in 4 KiB pages. A decode step reads a few positions of each
    sequence's rows, so huge pages buy it nothing."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    if nbytes == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):  # no anonymous private mappings (Windows): calloc'd zeros
        same_size = {2: np.int16, 4: np.float32, 1: np.int8}[itemsize]
        return torch.from_numpy(np.zeros(shape, dtype=same_size)).view(dtype)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        pages.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)  # the tensor keeps the mapping alive


STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
# cache dtype -> the same-size integer view its writes scatter through (see KVCache.__init__)
SCATTER_VIEWS = {torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8, torch.float16: torch.int16,
                 torch.bfloat16: torch.int16}


def _quantize(x: torch.Tensor, scale: torch.Tensor, quant: str) -> torch.Tensor:
    """Stored form of keys/values with a dequantization scale: round and saturate to int8, or cast to FP8 e4m3."""
    if quant == "int8":
        return torch.clamp(torch.round(x.float() / scale), -128, 127).to(torch.int8)
    return torch.clamp(x.float() / scale, -448.0, 448.0).to(torch.float8_e4m3fn)


class KVCache(nn.Module):
    """Keys and values of one layer, [max_batch, kv_heads, max_seq, head_size]; KV heads are never repeated here.
    With `quant` ("int8" or "fp8") the cache stores quantized values (TensorRT-LLM's INT8/FP8 KV cache) and
    `update` takes the layer's dequantization scale. A `ring` cache (sliding-window layers) holds position p in slot
    p % max_seq and returns slots, not positions (see pipeline.runtime.model.ring_mask)."""

    def __init__(self, max_batch: int, kv_heads: int, max_seq: int, head_size: int, dtype: torch.dtype,
                 quant: str | None = None, ring: bool = False):
        super().__init__()
        shape = (max_batch, kv_heads, max_seq, head_size)
        self.dtype, self.quant, self.ring = dtype, quant, ring
        storage = STORAGE[quant] if quant else dtype
        # The cache is written through a same-size integer view (a scatter copies bits: the same values) where
        # torch's CPU scatter of the dtype itself is missing or slow: it has no float8 kernel, and its float16 and
        # bfloat16 scatter converted the whole destination each call (torch 2.13: ~16 ms to write one position of
        # a [8, 3, 2048, 64] cache, against ~5 us through an int16 view; 60 such writes in a SmolLM2 decode step).
        self.scatter_view = SCATTER_VIEWS.get(storage)
        self.register_buffer("k", lazy_zeros(shape, storage), persistent=False)
        self.register_buffer("v", lazy_zeros(shape, storage), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int,
               scale: torch.Tensor | None = None):
        """Write k, v ([B, kv_heads, T, D]) at each sequence's positions input_pos ([B, T]); return this batch's
        keys and values for cache positions [0, kv_len) (dequantized when the cache is quantized); a ring cache
        writes slots input_pos % size and returns slots [0, min(kv_len, size))."""
        b, heads, t, d = k.shape
        if self.ring:  # fixed per layer
            input_pos = torch.remainder(input_pos, self.k.shape[2])
            kv_len = min(kv_len, self.k.shape[2])
        if self.quant:
            k, v = _quantize(k, scale, self.quant), _quantize(v, scale, self.quant)
        # One in-place scatter per tensor along the position dim: each sequence's rows at its own positions. (An
        # advanced-index assignment over rows and positions costs several times more per decode step.)
        index = input_pos[:, None, :, None].expand(b, heads, t, d)
        k_rows, v_rows = self.k[:b], self.v[:b]
        if self.scatter_view is not None:  # fixed per cache (float8 and 16-bit float storage)
            k_rows.view(self.scatter_view).scatter_(2, index, k.view(self.scatter_view))
            v_rows.view(self.scatter_view).scatter_(2, index, v.view(self.scatter_view))
        else:
            k_rows.scatter_(2, index, k)
            v_rows.scatter_(2, index, v)
        k_all, v_all = k_rows[:, :, :kv_len], v_rows[:, :, :kv_len]
        if self.quant:
            k_all = (k_all.float() * scale).to(self.dtype)
            v_all = (v_all.float() * scale).to(self.dtype)
        return k_all, v_all

    def reorder_rows(self, src: torch.Tensor, dst: torch.Tensor, start: int, end: int) -> None:
        """Beam search: rows `dst` take the keys and values of rows `src` at cache positions [start, end). A gather
        of just those rows and positions (the prompt part, shared by a request's beams, is never copied)."""
        if self.ring and end > self.k.shape[2]:  # the positions wrapped: slots no longer follow positions
            start, end = 0, self.k.shape[2]
        if end > start and len(dst):
            self.k[dst, :, start:end] = self.k[src, :, start:end]
            self.v[dst, :, start:end] = self.v[src, :, start:end]
