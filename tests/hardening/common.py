"""Shared helpers: a tiny model, the recipe for it, real pipeline processes and artifact digests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAGES = ("convert", "build")


def recipe(model: Path, cache: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["model=hf_local", f"model.path={model}", f"cache_dir={cache}", "progress=false",
            f"hydra.run.dir={run_dir}", "stages=[convert,build]", "build.smoke_test_tokens=0",
            "build.max_input_len=32", "build.max_seq_len=64", *extra]


def spawn(args: list[str], **env: str) -> subprocess.Popen:
    """`trtllm-pipeline ARGS` as a real process."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=environment, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def final_outputs(run_dir: Path) -> dict[str, dict]:
    """stage -> the manifest's {file: {size, sha256}} of the artifacts a finished run used."""
    record = json.loads((run_dir / "run.json").read_text())
    return {name: json.loads((Path(s["artifact"]) / "manifest.json").read_text())["outputs"]
            for name, s in record["stages"].items()}


def leftovers(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for pattern in (".tmp-*", ".evicted-*", "*.lock", "*.lease")
                  for p in cache.rglob(pattern))
