"""Tensor-parallel split rules, applied to canonical (whole) tensors to get one rank's piece.

Every rule works on real tensors and on `meta` tensors alike, so the same code computes a rank's tensor during
conversion and its expected shape during validation. Fused targets are split part by part, then concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import torch

from pipeline.errors import PipelineError


class Split(str, Enum):
    REPLICATE = "replicate"  # full copy on every rank (norms, row-parallel biases)
    COLUMN = "column"  # chunk the output dim (rows of an (out, in) weight; a bias like its rows)
    ROW = "row"  # chunk the input dim (columns)
    VOCAB = "vocab"  # pad rows to a multiple of tp_size with zeros, then chunk rows (lm_head)
    EMBEDDING = "embedding"  # vocab_embedding: replicated, or VOCAB (dim 0) / ROW-like (dim 1) when parallel
    QKV_HEADS = "qkv_heads"  # parts (q, k, v): split each by heads, duplicating KV heads when tp_size > kv heads
    RANK0 = "rank0"  # a bias added before the reduction: the full tensor on tp rank 0, zeros on the others (GPT-J)
    # Stacked expert weights (E, out, in): this rank's experts (moe_ep), then each part's out dim chunked over moe_tp
    # and the parts concatenated on it (MoE fc = [w3; w1] per rank).
    EXPERT_COLUMN = "expert_column"
    # Stacked expert weights (E, out, in): this rank's experts, the in dim chunked over moe_tp (MoE proj).
    EXPERT_ROW = "expert_row"


def moe_parallel(mapping: Mapping[str, Any]) -> tuple[int, int]:
    """(moe_tp_size, moe_ep_size) of a checkpoint mapping, resolved as TensorRT-LLM's Mapping does: absent or -1 on
    both means all tensor parallelism (moe_tp = tp, moe_ep = 1); one of them -1 is derived from the other."""
    tp = mapping["tp_size"]
    moe_tp, moe_ep = mapping.get("moe_tp_size", -1), mapping.get("moe_ep_size", -1)
    if moe_tp == -1 and moe_ep == -1:
        return tp, 1
    if moe_tp == -1:
        return tp // moe_ep, moe_ep
    if moe_ep == -1:
        return moe_tp, tp // moe_tp
    return moe_tp, moe_ep


@dataclass(frozen=True)
class ShardContext:
    tp_size: int
    heads: int
    kv_heads: int
    head_size: int
    use_parallel_embedding: bool
    embedding_sharding_dim: int
    moe_tp_size: int = 1
    moe_ep_size: int = 1

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ShardContext":
        from pipeline.convert.canonical import Dims

        dims = Dims.from_config(cfg)
        moe_tp, moe_ep = moe_parallel(cfg["mapping"])
        return cls(
            tp_size=cfg["mapping"]["tp_size"],
            heads=dims.heads,
            kv_heads=dims.kv_heads,
            head_size=dims.head_size,
            use_parallel_embedding=bool(cfg.get("use_parallel_embedding", False)),
            embedding_sharding_dim=int(cfg.get("embedding_sharding_dim", 0)),
            moe_tp_size=moe_tp,
            moe_ep_size=moe_ep,
        )

    @property
    def kv_heads_per_rank(self) -> int:
        return -(-self.kv_heads // self.tp_size)

    def moe_ranks(self, tp_rank: int) -> tuple[int, int]:
        """(moe_tp_rank, moe_ep_rank) of a tp rank: expert-parallel ranks are consecutive, as in TensorRT-LLM."""
        return tp_rank // self.moe_ep_size, tp_rank % self.moe_ep_size


def _chunk(t: torch.Tensor, dim: int, rank: int, tp: int, what: str, size_name: str = "tp_size") -> torch.Tensor:
    if t.shape[dim] % tp:
        raise PipelineError(f"{what}: dimension {dim} of size {t.shape[dim]} is not divisible by {size_name}={tp}")
    size = t.shape[dim] // tp
    return t.narrow(dim, rank * size, size)


def _pad_rows(t: torch.Tensor, tp: int) -> torch.Tensor:
    pad = -t.shape[0] % tp
    if not pad:
        return t
    import torch  # the split rules are imported by key computations, which need no tensor library

    return concat([t, t.new_zeros((pad, *t.shape[1:]))], dim=0)


def _duplicate_kv_heads(t: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
    """Repeat each KV head tp_size/kv_heads times consecutively ([k0, k0, k1, k1, ...]) so every rank gets one."""
    if ctx.kv_heads >= ctx.tp_size:
        return t
    reps = ctx.tp_size // ctx.kv_heads
    heads = t.reshape(ctx.kv_heads, ctx.head_size, *t.shape[1:])
    return heads.repeat_interleave(reps, dim=0).reshape(ctx.tp_size * ctx.head_size, *t.shape[1:])


def shard(parts: Sequence[torch.Tensor], split: Split, rank: int, ctx: ShardContext, what: str) -> torch.Tensor:
    """One tp rank's piece of the target built from `parts` (canonical tensors, in fuse order)."""
    import torch

    tp = ctx.tp_size
    if split is Split.QKV_HEADS:
        q, k, v = parts
        pieces = [_chunk(q, 0, rank, tp, what)]
        pieces += [_chunk(_duplicate_kv_heads(x, ctx), 0, rank, tp, what) for x in (k, v)]
        return concat(pieces, dim=0)
    if split is Split.EMBEDDING:
        if not ctx.use_parallel_embedding:
            split = Split.REPLICATE
        elif ctx.embedding_sharding_dim == 0:
            split = Split.VOCAB
        else:
            return _fuse([_chunk(p, 1, rank, tp, what) for p in parts])
    if split is Split.REPLICATE:
        return _fuse(list(parts))
    if split is Split.RANK0:
        full = _fuse(list(parts))
        return full if rank == 0 else torch.zeros_like(full)
    if split is Split.COLUMN:
        return _fuse([_chunk(p, 0, rank, tp, what) for p in parts])
    if split is Split.ROW:
        return _fuse([_chunk(p, 1, rank, tp, what) for p in parts])
    if split is Split.VOCAB:
        return _fuse([_chunk(_pad_rows(p, tp), 0, rank, tp, what) for p in parts])
    if split in (Split.EXPERT_COLUMN, Split.EXPERT_ROW):
        moe_tp_rank, moe_ep_rank = ctx.moe_ranks(rank)
        dim = 1 if split is Split.EXPERT_COLUMN else 2
        pieces = [_chunk(_chunk(p, 0, moe_ep_rank, ctx.moe_ep_size, what, "moe_ep_size"), dim, moe_tp_rank,
                         ctx.moe_tp_size, what, "moe_tp_size") for p in parts]
        return concat(pieces, dim=1)
    raise AssertionError(f"unhandled split kind {split}")


def _fuse(pieces: list[torch.Tensor]) -> torch.Tensor:
    return concat(pieces, dim=0)


def concat(pieces: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat (a single piece is returned as is). Meta tensors of one dtype and matching shapes, which the layout
    plan shards to learn every tensor's shape, get the result's shape directly: torch's meta `cat` is a Python
    registration whose first call imports torch._dynamo, about 2 s of every convert's start."""
    import torch

    if len(pieces) == 1:
        return pieces[0]
    first = pieces[0]
    if all(p.is_meta and p.dtype == first.dtype and p.dim() == first.dim() for p in pieces) and first.dim():
        d = dim % first.dim()
        if all(p.shape[:d] == first.shape[:d] and p.shape[d + 1:] == first.shape[d + 1:] for p in pieces):
            shape = list(first.shape)
            shape[d] = sum(p.shape[d] for p in pieces)
            return torch.empty(shape, dtype=first.dtype, device="meta")
    return torch.cat(list(pieces), dim=dim)
