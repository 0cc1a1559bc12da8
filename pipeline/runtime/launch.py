"""Running an engine on all its ranks: in this process for one rank, under `mpirun` for several."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.runtime.parallel import mpi_world


def engine_world_size(engine_dir: Path) -> int:
    path = Path(engine_dir) / "config.json"
    if not path.is_file():
        raise PipelineError(f"{engine_dir} is not an engine directory: config.json is missing")
    return json.loads(path.read_text())["pretrained_config"]["mapping"]["world_size"]


def mpirun_command(world_size: int, module: str, args: list[str]) -> list[str]:
    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    if mpirun is None:
        raise PipelineError("this engine needs several ranks but mpirun is not on PATH; install it with: "
                            "pip install mpi4py mpich")
    return [mpirun, "-n", str(world_size), sys.executable, "-m", module, *args]


def run_module_on_ranks(world_size: int, module: str, args: list[str], timeout: float | None = None) -> str:
    """Run `python -m module args` on `world_size` ranks under mpirun; return rank 0's standard output."""
    cmd = mpirun_command(world_size, module, args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        detail = errors[0][len("error: "):] if errors else proc.stderr.strip()[-2000:]
        raise PipelineError(f"{' '.join(cmd[:3])} ... {module} failed: {detail}")
    return proc.stdout


def smoke_test(engine_dir: Path, max_new_tokens: int) -> dict[str, Any]:
    """Load the engine on all its ranks and greedily generate from a fixed prompt; report load time and speed."""
    world = engine_world_size(engine_dir)
    args = ["--engine_dir", str(engine_dir), "--input_ids", "1,2,3,4,5,6,7,8", "--max_new_tokens",
            str(max_new_tokens), "--json"]
    if world == 1 and mpi_world()[1] == 1:
        from pipeline.run import generate_from_args, parse_args

        result = generate_from_args(parse_args(args))
    else:
        lines = [line for line in run_module_on_ranks(world, "pipeline.run", args).splitlines() if line.startswith("{")]
        result = json.loads(lines[-1])
    return {"smoke_load_seconds": result["load_seconds"], "smoke_tokens_per_second": result["tokens_per_second"],
            "smoke_world_size": world}
