"""The shell benchmarks' interpreter (benchmarks/python.sh): $BENCH_PYTHON when set (not $PYTHON, which
scripts/setup.sh reads as the interpreter to make .venv from), else the project's .venv, else python3;
one that cannot import the pipeline's dependencies stops the benchmark with one line naming it."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

SOURCE = f'source "{REPO / "benchmarks" / "python.sh"}" && echo "$PY|$BIN"'


def _run(env_python: str | None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "BENCH_PYTHON")}
    if env_python is not None:
        env["BENCH_PYTHON"] = env_python
    return subprocess.run(["bash", "-c", SOURCE], env=env, capture_output=True, text=True, timeout=120)


def test_python_setting_wins():
    proc = _run(sys.executable)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{sys.executable}|{os.path.dirname(sys.executable)}"


def test_an_interpreter_without_the_dependencies_is_named(tmp_path):
    bare = tmp_path / "python"
    bare.write_text("#!/bin/sh\nexit 1\n")  # imports nothing
    bare.chmod(0o755)
    proc = _run(str(bare))
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bare) in lines[0] and "scripts/setup.sh" in lines[0], proc.stderr
