"""benchmarks/llama_cpp_compare.py is optional: without llama.cpp's tools it says so in one line and succeeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_skips_with_one_line_without_llama_bench(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_BENCH"}
    env["PATH"] = str(tmp_path)  # no llama-bench anywhere
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "llama_cpp_compare.py")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "llama-bench" in lines[0] and "skipped" in lines[0], proc.stdout


def test_llama_bench_rate_is_the_best_sample(tmp_path):
    """Each side reports its best repetition: llama-bench's best sample (its average where it gives no samples)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from llama_cpp_compare import llama_bench
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    rows = [{"model_filename": "/m/a.gguf", "avg_ts": 100.0, "samples_ts": [90.0, 120.5, 89.5]},
            {"model_filename": "/m/b.gguf", "avg_ts": 55.0}]
    fake = tmp_path / "llama-bench"
    fake.write_text(f"#!/bin/sh\ncat <<'JSON'\n{json.dumps(rows)}\nJSON\n")
    fake.chmod(0o755)
    assert llama_bench(fake, [Path("/m/a.gguf"), Path("/m/b.gguf")], 2, 8, 3) == {"a.gguf": 120.5, "b.gguf": 55.0}
