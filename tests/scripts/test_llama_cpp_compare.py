"""benchmarks/llama_cpp_compare.py is optional: without llama.cpp's tools it says so in one line and succeeds."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_skips_with_one_line_without_llama_bench(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_BENCH"}
    env["PATH"] = str(tmp_path)  # no llama-bench anywhere
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "llama_cpp_compare.py")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "llama-bench" in lines[0] and "skipped" in lines[0], proc.stdout
