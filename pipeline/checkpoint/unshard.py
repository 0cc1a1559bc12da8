"""The inverse of `sharding.shard`: one target's tp rank pieces back to its whole canonical parts.

`pieces(tp_rank)` reads one rank's piece lazily, so a replicated tensor is read from rank 0 only. Every split kind
of `sharding.Split` has its inverse here; padding added by the vocabulary split is dropped (it must be zeros) and KV
heads duplicated over ranks are read once. float8 tensors are handled as their bytes (not every op has float8
kernels). A rank piece of an unexpected shape is an error naming the tensor.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from pipeline.checkpoint.sharding import ShardContext, Split
from pipeline.errors import PipelineError

PieceReader = Callable[[int], torch.Tensor]
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def unshard(pieces: PieceReader, split: Split, shapes: Sequence[tuple[int, ...]], ctx: ShardContext,
            what: str) -> list[torch.Tensor]:
    """The whole parts (of `shapes`, in fuse order) of a target from its tp rank pieces."""
    cache: dict[int, torch.Tensor] = {}
    dtype: list[torch.dtype] = []

    def piece(rank: int) -> torch.Tensor:
        if rank not in cache:
            t = pieces(rank)
            dtype.append(t.dtype)
            cache[rank] = t.view(torch.uint8) if t.dtype in _FLOAT8 else t
        return cache[rank]

    parts = _unshard(piece, split, [tuple(s) for s in shapes], ctx, what)
    for p, s in zip(parts, shapes):
        if tuple(p.shape) != tuple(s):
            raise PipelineError(f"{what}: the rank pieces reassemble to shape {tuple(p.shape)}, expected {tuple(s)}")
    if dtype and dtype[0] in _FLOAT8:
        parts = [p.view(dtype[0]) for p in parts]
    return parts


def _split_rows(t: torch.Tensor, sizes: list[int], what: str) -> list[torch.Tensor]:
    if t.shape[0] != sum(sizes):
        raise PipelineError(f"{what}: a rank piece has {t.shape[0]} rows, expected {sum(sizes)} for this mapping")
    return list(t.split(sizes, dim=0))


def _unshard(piece, split: Split, shapes, ctx: ShardContext, what: str) -> list[torch.Tensor]:
    tp = ctx.tp_size
    if split is Split.EMBEDDING:
        if not ctx.use_parallel_embedding:
            split = Split.REPLICATE
        elif ctx.embedding_sharding_dim == 0:
            split = Split.VOCAB
        else:
            split = Split.ROW
    if split in (Split.REPLICATE, Split.RANK0):
        return _split_rows(piece(0), [s[0] for s in shapes], what)
    if split is Split.COLUMN:
        per_rank = [_split_rows(piece(r), [s[0] // tp for s in shapes], what) for r in range(tp)]
        return [torch.cat([per_rank[r][i] for r in range(tp)], dim=0) for i in range(len(shapes))]
    if split is Split.ROW:
        per_rank = [_split_rows(piece(r), [s[0] for s in shapes], what) for r in range(tp)]
        return [torch.cat([per_rank[r][i] for r in range(tp)], dim=1) for i in range(len(shapes))]
    if split is Split.VOCAB:
        padded = [-(-s[0] // tp) * tp for s in shapes]
        per_rank = [_split_rows(piece(r), [p // tp for p in padded], what) for r in range(tp)]
        whole = [torch.cat([per_rank[r][i] for r in range(tp)], dim=0) for i in range(len(shapes))]
        for w, s in zip(whole, shapes):
            if w.shape[0] > s[0] and torch.count_nonzero(w[s[0]:]):
                raise PipelineError(f"{what}: the padding rows beyond {s[0]} are not zero")
        return [w[: s[0]] for w, s in zip(whole, shapes)]
    if split is Split.QKV_HEADS:
        return _unshard_qkv(piece, shapes, ctx, what)
    if split in (Split.EXPERT_COLUMN, Split.EXPERT_ROW):
        return _unshard_experts(piece, split, shapes, ctx, what)
    raise AssertionError(f"unhandled split kind {split}")


def _unshard_qkv(piece, shapes, ctx: ShardContext, what: str) -> list[torch.Tensor]:
    tp = ctx.tp_size
    q_rows, kv_rows = shapes[0][0], shapes[1][0]
    kv_local = kv_rows // tp if ctx.kv_heads >= tp else ctx.head_size
    sizes = [q_rows // tp, kv_local, kv_local]
    per_rank = {r: _split_rows(piece(r), sizes, what) for r in range(tp)}
    q = torch.cat([per_rank[r][0] for r in range(tp)], dim=0)
    if ctx.kv_heads >= tp:
        k = torch.cat([per_rank[r][1] for r in range(tp)], dim=0)
        v = torch.cat([per_rank[r][2] for r in range(tp)], dim=0)
    else:  # each KV head duplicated on tp / kv_heads consecutive ranks: take the first copy
        reps = tp // ctx.kv_heads
        k = torch.cat([per_rank[h * reps][1] for h in range(ctx.kv_heads)], dim=0)
        v = torch.cat([per_rank[h * reps][2] for h in range(ctx.kv_heads)], dim=0)
    return [q, k, v]


def _unshard_experts(piece, split: Split, shapes, ctx: ShardContext, what: str) -> list[torch.Tensor]:
    ep, moe_tp = ctx.moe_ep_size, ctx.moe_tp_size
    dim = 1 if split is Split.EXPERT_COLUMN else 2
    parts = []
    for i, shape in enumerate(shapes):
        blocks = []
        for ep_rank in range(ep):
            chunks = []
            for tp_rank in range(moe_tp):
                t = piece(tp_rank * ep + ep_rank)  # tp rank r holds moe_tp rank r // ep, moe_ep rank r % ep
                if dim == 1:
                    width = shape[1] // moe_tp
                    t = t.narrow(1, sum(s[1] // moe_tp for s in shapes[:i]), width)
                chunks.append(t)
            blocks.append(torch.cat(chunks, dim=dim))
        parts.append(torch.cat(blocks, dim=0))
    return parts
