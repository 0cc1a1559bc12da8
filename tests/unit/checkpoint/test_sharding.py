"""Split rules on small hand-made tensors, where the expected pieces can be written out."""

from __future__ import annotations

import pytest
import torch

from pipeline.checkpoint.sharding import ShardContext, Split, shard
from pipeline.errors import PipelineError


def ctx(tp, heads=4, kv=2, d=2, parallel_embedding=False, dim=0):
    return ShardContext(tp, heads, kv, d, parallel_embedding, dim)


def rows(n, cols=1):
    return torch.arange(n, dtype=torch.float32).repeat_interleave(cols).reshape(n, cols)


def test_qkv_split_per_part_then_concat():
    q, k, v = rows(8), rows(4) + 100, rows(4) + 200  # 4 q heads, 2 kv heads, head_size 2
    r1 = shard([q, k, v], Split.QKV_HEADS, 1, ctx(2), "qkv")
    assert r1[:, 0].tolist() == [4, 5, 6, 7, 102, 103, 202, 203]


def test_kv_heads_duplicated_when_tp_exceeds_them():
    q, k, v = rows(8), rows(4) + 100, rows(4) + 200
    pieces = [shard([q, k, v], Split.QKV_HEADS, r, ctx(4), "qkv")[:, 0].tolist() for r in range(4)]
    # ranks 0,1 share kv head 0; ranks 2,3 share kv head 1
    assert pieces[0] == [0, 1, 100, 101, 200, 201]
    assert pieces[1] == [2, 3, 100, 101, 200, 201]
    assert pieces[3] == [6, 7, 102, 103, 202, 203]


def test_vocab_padding_with_zero_rows():
    head = rows(5, 3) + 1
    pieces = [shard([head], Split.VOCAB, r, ctx(2), "lm_head") for r in range(2)]
    assert [p.shape[0] for p in pieces] == [3, 3]
    assert torch.equal(pieces[1][2], torch.zeros(3))


@pytest.mark.parametrize("parallel,dim,shape", [(False, 0, (5, 4)), (True, 0, (3, 4)), (True, 1, (5, 2))])
def test_embedding_modes(parallel, dim, shape):
    emb = torch.randn(5, 4)
    assert tuple(shard([emb], Split.EMBEDDING, 1, ctx(2, parallel_embedding=parallel, dim=dim), "emb").shape) == shape


def test_row_and_column():
    w = torch.arange(24.0).reshape(4, 6)
    assert torch.equal(shard([w], Split.COLUMN, 1, ctx(2), "w"), w[2:])
    assert torch.equal(shard([w], Split.ROW, 1, ctx(2), "w"), w[:, 3:])
    assert torch.equal(shard([w], Split.REPLICATE, 1, ctx(2), "w"), w)


def test_indivisible_split_names_the_tensor():
    with pytest.raises(PipelineError, match="mlp.fc.*not divisible by tp_size=4"):
        shard([torch.zeros(6, 2)], Split.COLUMN, 0, ctx(4), "transformer.layers.0.mlp.fc.weight")


def test_meta_tensors_give_the_same_shapes():
    real = shard([torch.zeros(8, 3), torch.zeros(4, 3), torch.zeros(4, 3)], Split.QKV_HEADS, 0, ctx(4), "qkv")
    meta = shard([torch.empty(8, 3, device="meta"), torch.empty(4, 3, device="meta"), torch.empty(4, 3, device="meta")],
                 Split.QKV_HEADS, 0, ctx(4), "qkv")
    assert real.shape == meta.shape
