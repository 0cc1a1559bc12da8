"""Running an engine on all its ranks: in this process for one rank, under `mpirun` for several."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


def engine_world_size(engine_dir: Path) -> int:
    path = Path(engine_dir) / "config.json"
    if not path.is_file():
        raise PipelineError(f"{engine_dir} is not an engine directory: config.json is missing")
    return json.loads(path.read_text())["pretrained_config"]["mapping"]["world_size"]


MPI_LAUNCHERS = ("mpirun", "mpiexec")


def mpirun_candidates() -> list[Path]:
    """Where an MPI launcher may be, in the order tried: beside the interpreter running the pipeline (a virtual
    environment or prefix with `mpich` installed, activated or not), on PATH, in the `mpich` package's own bin."""
    places = [Path(sys.executable).parent / name for name in MPI_LAUNCHERS]  # not resolved: a venv's bin is a link
    places += [Path(found) for name in MPI_LAUNCHERS if (found := shutil.which(name))]
    places += [bin_dir / name for bin_dir in _mpich_package_bins() for name in MPI_LAUNCHERS]
    return list(dict.fromkeys(places))


def _mpich_package_bins() -> list[Path]:
    try:
        dist = metadata.distribution("mpich")
    except metadata.PackageNotFoundError:
        return []
    return list(dict.fromkeys(Path(dist.locate_file(f)).resolve().parent for f in dist.files or []
                              if Path(f).name in MPI_LAUNCHERS))


@functools.lru_cache(maxsize=1)
def mpi4py_library() -> Path | None:
    """The MPI library mpi4py loads in this interpreter (asked in a child process: loading MPI here would initialize
    it in the parent), or None when mpi4py cannot tell."""
    try:
        proc = subprocess.run([sys.executable, "-m", "mpi4py", "--mpi-library"], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = proc.stdout.strip().splitlines()
    return Path(lines[-1]).resolve() if proc.returncode == 0 and lines and Path(lines[-1]).is_absolute() else None


def _same_mpi(launcher: Path, library: Path | None) -> bool:
    """A launcher belongs to the MPI of `library` when both lie under one installation prefix (bin/ and lib/)."""
    return library is None or library.is_relative_to(launcher.resolve().parent.parent)


def find_mpirun() -> Path:
    """The MPI launcher for multi-rank runs: the first candidate that exists and is the MPI mpi4py uses."""
    candidates = mpirun_candidates()
    existing = [c for c in candidates if c.is_file() and os.access(c, os.X_OK)]
    library = mpi4py_library() if existing else None
    for launcher in existing:
        if _same_mpi(launcher, library):
            log.debug("MPI launcher: %s (mpi4py loads %s)", launcher, library or "an MPI it cannot name")
            return launcher
    if existing:
        raise PipelineError(f"this engine needs several ranks but no MPI launcher matches the MPI library mpi4py loads "
                            f"({library}); found only {', '.join(map(str, existing))}; install the matching one "
                            f"with: {sys.executable} -m pip install mpi4py mpich")
    raise PipelineError(f"this engine needs several ranks but no mpirun or mpiexec was found beside {sys.executable}, "
                        f"on PATH or in the mpich package; install it with: {sys.executable} -m pip install mpi4py mpich")


def mpirun_command(world_size: int, module: str, args: list[str]) -> list[str]:
    """Every rank runs this very interpreter (no `python` looked up on PATH), under the launcher of mpi4py's MPI."""
    return [str(find_mpirun()), "-n", str(world_size), sys.executable, "-m", module, *args]


def rank_environment(launcher: str) -> dict[str, str]:
    """The parent's environment for the ranks, with the launcher's own directory first on PATH: MPICH's Hydra starts
    its helper (hydra_pmi_proxy) from PATH."""
    path = os.environ.get("PATH", "")
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PATH": os.pathsep.join([str(Path(launcher).parent), *([path] if path else [])])}


def run_module_on_ranks(world_size: int, module: str, args: list[str], timeout: float | None = None) -> str:
    """Run `python -m module args` on `world_size` ranks under mpirun; return rank 0's standard output.

    A rank that dies (killed, crashed) ends the job: MPICH's mpirun stops the other ranks when one terminates badly,
    and the survivors' collectives fail as soon as a peer's connection drops; the failure becomes one error line.
    mpirun itself is told to stop (SIGTERM, which it passes to the ranks) when this process dies, so a killed run
    leaves no ranks behind."""
    cmd = mpirun_command(world_size, module, args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=rank_environment(cmd[0]), timeout=timeout,
                          preexec_fn=_parent_death_signal())
    if proc.returncode != 0:
        failure = rank_failure(proc.stderr, proc.stdout, proc.returncode)
        raise PipelineError(f"{' '.join(cmd[:3])} ... {module} failed: {failure}")
    return proc.stdout


_BANNER = re.compile(r"PID (\d+) RUNNING AT (\S+)")
_EXIT_STRING = re.compile(r"EXIT STRING: .*\(signal (\d+)\)")


def rank_failure(stderr: str, stdout: str, returncode: int) -> str:
    """One line for a failed multi-rank job from what it printed: a rank's own `error:` line, else the rank mpirun
    saw die and how (MPICH's mpirun reports that on standard output), else the last line of standard error."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if errors:
        return errors[0][len("error: "):]
    banner, signal_match = _BANNER.search(stdout + stderr), _EXIT_STRING.search(stdout + stderr)
    if banner:
        how = f"exit code {returncode}"
        if signal_match:
            number = int(signal_match.group(1))
            how = f"signal {number} ({_signal_name(number)})"
        return (f"a rank (pid {banner.group(1)} on host {banner.group(2)}) was ended by {how}; mpirun stopped the "
                f"other ranks. Nothing of this stage was published: run the same command again to resume")
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith("=")]
    return f"exit code {returncode}: {lines[-1] if lines else 'no output'}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


def _parent_death_signal():
    """A function for the mpirun child that asks the kernel for SIGTERM when the pipeline process dies (Linux), even
    by kill -9; prepared in the parent because a forked child of a threaded process must not import or load
    libraries (the import lock may be held by another thread at the fork)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()
    pr_set_pdeathsig = 1

    def in_child() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect: nobody will send the signal
            os._exit(1)

    return in_child
