"""Ranks and their communication: one process per rank under `mpirun`, collectives through torch.distributed (gloo).

mpi4py tells each process its rank and the world size and broadcasts the rendezvous port; torch.distributed then
carries tensors: TP all-reduce / all-gather inside a pipeline stage, PP send/recv between stages, broadcasts of the
sampled tokens so every rank returns the same outputs. A single process (world size 1) needs none of it.
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pipeline import faults
from pipeline.errors import PipelineError
from pipeline.mpi_env import launched_by_mpirun


class WorldSizeMismatch(PipelineError):
    """The job has another number of ranks than the engine's mapping. Every rank finds it alike, so rank 0 alone
    reports it and all end with exit code 2 (no MPI abort: no rank waits on another)."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


@dataclass
class Dist:
    """This process's place in the mapping (rank = pp_rank * tp_size + tp_rank) and its process groups."""

    rank: int = 0
    tp_size: int = 1
    pp_size: int = 1
    tp_group: Any = None
    groups: dict = field(default_factory=dict)
    # Stands in for torch.distributed in the TP collectives when set: the ONNX export records each collective as a
    # graph node there (pipeline/engine/onnx_export.py), where the runtime later performs it between graph segments.
    collectives: Any = None

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, pp_rank: int) -> int:
        """Global rank of the process with this tp rank in another pipeline stage."""
        return pp_rank * self.tp_size + self.tp_rank

    @property
    def last_stage_root(self) -> int:
        return (self.pp_size - 1) * self.tp_size


def mpi_world() -> tuple[int, int]:
    """(rank, size) from MPI when launched by mpirun, else (0, 1) without importing MPI."""
    if not launched_by_mpirun():
        return 0, 1
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


def init_dist(tp_size: int, pp_size: int, rank: int | None = None) -> Dist:
    """Join the job. `rank` given explicitly (world size 1 use only) skips MPI."""
    world = tp_size * pp_size
    if rank is not None and world == 1:
        return Dist(rank, tp_size, pp_size)
    mpi_rank, mpi_size = mpi_world()
    if mpi_size != world:
        raise WorldSizeMismatch(
            f"the engine was built for world_size={world} (tp_size={tp_size} x pp_size={pp_size}) but this job has "
            f"{mpi_size} rank(s); launch it with: mpirun -n {world} ...", mpi_rank)
    if rank is not None and rank != mpi_rank:
        raise PipelineError(f"rank={rank} was requested but MPI says this process is rank {mpi_rank}")
    d = Dist(mpi_rank, tp_size, pp_size)
    if world == 1:
        return d
    # Ranks on one machine share its cores: oversubscribed OpenMP pools spin against each other.
    # TRTLLM_PIPELINE_CORES: the cores this run may use when sweep points share the machine (pipeline/cli.py).
    cores = int(os.environ.get("TRTLLM_PIPELINE_CORES") or os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // _local_ranks()))
    if not dist.is_initialized():
        from mpi4py import MPI

        dist.init_process_group("gloo", store=_rendezvous_store(MPI.COMM_WORLD, mpi_rank, world), rank=mpi_rank,
                                world_size=world)
        # Tear the groups down before the interpreter does: gloo's threads abort the process if destroyed late.
        atexit.register(_shutdown)
        # A rank that dies of an exception takes the job down, instead of leaving its peers blocked in a collective.
        sys.excepthook = _abort_on_exception(sys.excepthook)
    # Every process creates every group, in the same order, as torch.distributed requires.
    for pp in range(pp_size):
        ranks = list(range(pp * tp_size, (pp + 1) * tp_size))
        group = dist.new_group(ranks) if tp_size > 1 else None
        if mpi_rank in ranks:
            d.tp_group = group
    faults.point("rank:joined")
    return d


def abort_job(code: int = 1) -> None:
    """End every rank of an MPI job (no-op outside one): a failure on one rank must not leave others waiting."""
    if mpi_world()[1] > 1:
        from mpi4py import MPI

        sys.stdout.flush()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(code)


def report_rank_error(e: PipelineError) -> int:
    """The `error:` line of a rank's failure and the exit code: a world-size mismatch (seen by every rank) is
    printed by rank 0 only; any other error ends the whole job, so that no rank waits on this one."""
    if isinstance(e, WorldSizeMismatch):
        if e.rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"error: {e}", file=sys.stderr, flush=True)
    abort_job(2)
    return 2


def _abort_on_exception(previous):
    def hook(kind, value, tb):
        previous(kind, value, tb)
        abort_job(1)

    return hook


def _local_ranks() -> int:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED).Get_size()


def _shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _rendezvous_store(comm, rank: int, world: int) -> dist.TCPStore:
    """Rank 0's store binds a port of the kernel's choosing and keeps it; the others learn it over MPI. (Probing for a
    free port and binding it later races with every other job on the machine picking ports the same way.)"""
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False) if rank == 0 else None
    port = comm.bcast(store.port if rank == 0 else None, root=0)
    return store if rank == 0 else dist.TCPStore("127.0.0.1", port, world, is_master=False)


def tp_all_reduce(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum partial results of a row-parallel layer over the tensor-parallel group."""
    if d.tp_size == 1:
        return x
    if d.collectives is not None:
        return d.collectives.all_reduce(x)
    dist.all_reduce(x, group=d.tp_group)
    return x


def tp_all_gather(x: torch.Tensor, d: Dist, dim: int) -> torch.Tensor:
    """Concatenate each tp rank's slice along `dim` (vocab-parallel logits, column-sharded embeddings)."""
    if d.tp_size == 1:
        return x
    if d.collectives is not None:
        return d.collectives.all_gather(x, dim)
    parts = [torch.empty_like(x) for _ in range(d.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=d.tp_group)
    return torch.cat(parts, dim=dim)


def send_to_next_stage(x: torch.Tensor, d: Dist) -> None:
    dist.send(x.contiguous(), dst=d.stage_rank(d.pp_rank + 1))


def recv_from_prev_stage(shape: tuple[int, ...], dtype: torch.dtype, d: Dist) -> torch.Tensor:
    x = torch.empty(shape, dtype=dtype)
    dist.recv(x, src=d.stage_rank(d.pp_rank - 1))
    return x


def broadcast_from_last_stage(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Make every rank hold the last stage's tensor (sampled tokens, logits)."""
    if d.world_size == 1:
        return x
    dist.broadcast(x, src=d.last_stage_root)
    return x
