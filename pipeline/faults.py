"""Fault injection for crash and concurrency tests: named points where a run can be made to die or to wait.

`TRTLLM_PIPELINE_KILL_AT=<point>[#<n>]` makes the process SIGKILL itself the n-th time (default the first) it
reaches `<point>`: a `kill -9` at an exact place, without timing luck. With `TRTLLM_PIPELINE_KILL_RANK=<r>` only the
rank r of an MPI job is killed (the pipeline process and the other ranks go on): one dead rank of an mpirun. `TRTLLM_PIPELINE_BARRIER=<dir>:<count>@<point>`
makes each process that reaches `<point>` register in `<dir>` and wait until `<count>` processes have, so runs started
together really race. Both are read from the environment at each point, so they cost a dictionary lookup when unset.

Points: `<stage>:start` (key computed, before the cache lookup), `<stage>:locked`, `<stage>:outputs` (body done,
before the manifest), `<stage>:manifest` (manifest written, before the rename), `<stage>:published` (renamed,
before the lock is released), and inside stage bodies `convert:tensor` (after each tensor of every rank file) and
`build:rank` (after each engine rank file); in the processes of a multi-rank engine `rank:joined` (every rank
joined the job, before the first collective) and `evaluate:batch` (the engine side of an evaluation, after each
batch). `scripts/crash_matrix.py` kills at every point.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

KILL_ENV = "TRTLLM_PIPELINE_KILL_AT"
BARRIER_ENV = "TRTLLM_PIPELINE_BARRIER"
KILL_RANK_ENV = "TRTLLM_PIPELINE_KILL_RANK"
_reached: dict[str, int] = {}


def point(name: str) -> None:
    """A named place in the pipeline where a test may kill this process or hold it at a barrier."""
    kill, barrier = os.environ.get(KILL_ENV), os.environ.get(BARRIER_ENV)
    if not kill and not barrier:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if kill:
        target, _, nth = kill.partition("#")
        if target == name and _reached[name] == int(nth or 1) and _is_rank_to_kill():
            os.kill(os.getpid(), signal.SIGKILL)
    if barrier:
        where, _, at = barrier.rpartition("@")
        directory, _, count = where.rpartition(":")
        if at == name and _reached[name] == 1:
            _wait_at_barrier(Path(directory), int(count))


def _is_rank_to_kill() -> bool:
    """True unless TRTLLM_PIPELINE_KILL_RANK names another MPI rank (or this process is no rank at all)."""
    wanted = os.environ.get(KILL_RANK_ENV)
    if not wanted:
        return True
    from pipeline.mpi_env import launched_rank

    mine = launched_rank()
    return mine is not None and mine == int(wanted)


def _wait_at_barrier(directory: Path, count: int, timeout: float = 300.0) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / str(os.getpid())).touch()
    deadline = time.monotonic() + timeout
    while len(list(directory.iterdir())) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"barrier {directory}: {count} processes never arrived")
        time.sleep(0.01)
