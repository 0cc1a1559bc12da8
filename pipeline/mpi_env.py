"""What mpirun (MPICH, Open MPI) puts in every rank's environment, read without importing MPI: the CLI refuses an
outer mpirun, fault points pick their rank and the runtime decides whether to join a job, all from these names."""

from __future__ import annotations

import os

RANK_ENVS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK")
SIZE_ENVS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
LAUNCH_ENVS = (*RANK_ENVS, *SIZE_ENVS, "MPI_LOCALRANKID")


def launched_by_mpirun() -> bool:
    return any(k in os.environ for k in LAUNCH_ENVS)


def launched_rank() -> int | None:
    """This process's rank as mpirun set it; None outside mpirun."""
    return _first_int(RANK_ENVS)


def launched_size() -> int:
    """The job's size as mpirun set it; 1 outside mpirun."""
    size = _first_int(SIZE_ENVS)
    return 1 if size is None else size


def _first_int(names: tuple[str, ...]) -> int | None:
    return next((int(os.environ[k]) for k in names if os.environ.get(k, "").isdigit()), None)
