"""The KV cache's in-place write: each sequence's keys and values land at its own positions (or ring slots), nothing
else changes, and the returned view covers [0, kv_len) of this batch's rows."""

import os
from pathlib import Path

import pytest
import torch

from pipeline.runtime.kv_cache import KVCache
from pipeline.runtime.model import apply_rope


def reference_write(cache: torch.Tensor, pos: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    out = cache.clone()
    for b in range(pos.shape[0]):
        for t in range(pos.shape[1]):
            out[b, :, int(pos[b, t])] = new[b, :, t]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # 16-bit: through an int16 view
@pytest.mark.parametrize("ring", [False, True])
def test_update_writes_each_sequence_at_its_positions(ring, dtype):
    torch.manual_seed(0)
    cache = KVCache(max_batch=4, kv_heads=3, max_seq=10, head_size=8, dtype=dtype, ring=ring)
    cache.k.normal_()
    cache.v.normal_()
    before_k, before_v = cache.k.clone(), cache.v.clone()
    pos = torch.tensor([[7, 8, 9], [2, 3, 4], [11, 12, 13]])  # row 2 wraps in a ring of 10 slots
    if not ring:
        pos[2] = torch.tensor([0, 1, 5])
    k, v = torch.randn(3, 3, 3, 8).to(dtype), torch.randn(3, 3, 3, 8).to(dtype)
    k_t = torch.randn(3, 3, 8, 3).to(dtype).transpose(-1, -2)  # a strided source, as the attention's views are
    k_t.copy_(k)
    k_all, v_all = cache.update(pos, k_t, v, kv_len=14 if ring else 9)
    slots = pos % 10 if ring else pos
    torch.testing.assert_close(cache.k[:3], reference_write(before_k[:3], slots, k), rtol=0, atol=0)
    torch.testing.assert_close(cache.v[:3], reference_write(before_v[:3], slots, v), rtol=0, atol=0)
    assert torch.equal(cache.k[3], before_k[3]) and torch.equal(cache.v[3], before_v[3])  # rows beyond the batch
    assert k_all.shape == (3, 3, 10 if ring else 9, 8)
    assert torch.equal(k_all, cache.k[:3, :, : k_all.shape[2]]) and torch.equal(v_all, cache.v[:3, :, : v_all.shape[2]])


def test_quantized_update_stores_rounded_values_and_returns_them_dequantized():
    cache = KVCache(max_batch=2, kv_heads=1, max_seq=4, head_size=2, dtype=torch.float32, quant="int8")
    scale = torch.tensor([0.5])
    k = torch.tensor([[[[1.2, -3.1]]], [[[100.0, 0.2]]]])
    k_all, _ = cache.update(torch.tensor([[1], [3]]), k, k, kv_len=4, scale=scale)
    assert cache.k[0, 0, 1].tolist() == [2, -6] and cache.k[1, 0, 3].tolist() == [127, 0]
    assert k_all[1, 0, 3].tolist() == [63.5, 0.0] and k_all[0, 0, 0].tolist() == [0.0, 0.0]


def test_full_rotary_fast_path_equals_the_partial_formula():
    x, cos, sin = torch.randn(2, 5, 3, 8), torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8)
    x1, x2 = x.chunk(2, dim=-1)
    expected = x * cos + torch.cat([-x2, x1], dim=-1) * sin
    assert torch.equal(apply_rope(x, cos, sin), expected)
    partial = apply_rope(x, cos[..., :4], sin[..., :4])
    assert torch.equal(partial[..., 4:], x[..., 4:])


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="resident memory is read from Linux's /proc")
def test_a_cache_becomes_resident_only_where_written():
    # 2 x 128 MiB of cache, [8, 4, 4096, 256] float32: each sequence's KV head is 4 MiB, so a write at one position
    # of every row touches 64 pages. Huge pages would make that 64 x 2 MiB resident; 4 KiB pages, 256 KiB.
    cache = KVCache(8, 4, 4096, 256, torch.float32)
    before = _resident_bytes()
    k = torch.randn(8, 4, 1, 256)
    cache.update(torch.full((8, 1), 3000), k, -k, 3001)
    grown = _resident_bytes() - before
    assert grown < 16 * 2**20, f"writing one position of every row made {grown / 2**20:.0f} MiB resident"
    assert torch.equal(cache.k[:, :, 3000:3001], k) and torch.equal(cache.v[:, :, 3000:3001], -k)
    assert not cache.k[:, :, :3000].any() and not cache.v[:, :, 3001:].any()
