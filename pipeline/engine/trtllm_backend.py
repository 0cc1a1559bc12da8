"""The `trtllm` backend: an installed TensorRT-LLM release with the TensorRT engine flow (up to the 1.x releases)
builds the engines with its own `trtllm-build`.

Our build limits map onto trtllm-build's flags of the same names; anything else goes through `build.trtllm_args`
as given (a flag given there replaces ours). trtllm-build builds every rank itself (`--workers` builds them in
parallel); its engines go to `trtllm/` in the engine directory, its log to `trtllm-build.log`, and our engine
`config.json` (backend `trtllm`) sits beside them so the evaluate stage knows the world size and runs the engines
through `tensorrt_llm.runtime.ModelRunner` (under mpirun for several ranks; see pipeline.runtime.trtllm_runner).
The installed TensorRT-LLM version is part of the build's cache key.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.checkpoint.validate import validate_checkpoint
from pipeline.engine.limits import resolve_limits
from pipeline.errors import PipelineError
from pipeline.runtime.trtllm_runner import ENGINE_SUBDIR
from pipeline.schemas import validate

LOG_FILE = "trtllm-build.log"
INSTALL_HINT = ("build.backend=trtllm needs TensorRT-LLM with its TensorRT engine flow (a release up to 1.x, "
                "which provides trtllm-build), installed from NVIDIA's index on a machine with a GPU: "
                "pip install 'tensorrt-llm<2' --extra-index-url https://pypi.nvidia.com")


def trtllm_version() -> str:
    for name in ("tensorrt_llm", "tensorrt-llm"):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    raise PipelineError(f"TensorRT-LLM is not installed. {INSTALL_HINT}")


def trtllm_build_executable() -> str:
    exe = shutil.which("trtllm-build")
    if exe is None:
        raise PipelineError(f"trtllm-build is not on PATH. {INSTALL_HINT}")
    return exe


def trtllm_build_flags(checkpoint_dir: Path, output_dir: Path, limits: dict[str, Any], world_size: int,
                       extra: list[str]) -> list[str]:
    """trtllm-build's arguments: our limits under its flag names, then `extra`; a flag in `extra` replaces ours."""
    ours: list[tuple[str, str | None]] = [
        ("--checkpoint_dir", str(checkpoint_dir)),
        ("--output_dir", str(output_dir)),
        ("--max_batch_size", str(limits["max_batch_size"])),
        ("--max_input_len", str(limits["max_input_len"])),
        ("--max_seq_len", str(limits["max_seq_len"])),
        ("--max_num_tokens", str(limits["max_num_tokens"])),
        ("--max_beam_width", str(limits["max_beam_width"])),
        ("--logits_dtype", limits.get("logits_dtype", "float32")),
        ("--gemm_plugin", "auto"),
        ("--workers", str(world_size)),
    ]
    if limits["gather_context_logits"]:
        ours.append(("--gather_context_logits", None))
    if limits["gather_generation_logits"]:
        ours.append(("--gather_generation_logits", None))
    overridden = {a.split("=", 1)[0] for a in extra if a.startswith("--")}
    args: list[str] = []
    for flag, value in ours:
        if flag in overridden:
            continue
        args += [flag] if value is None else [flag, value]
    return args + list(extra)


class TrtllmBackend:
    name = "trtllm"

    def environment(self, build_config: dict[str, Any]) -> dict[str, Any]:
        return {"tensorrt_llm": trtllm_version()}

    def build(self, checkpoint_dir: Path, engine_dir: Path, build_config: dict[str, Any]) -> dict[str, Any]:
        version = trtllm_version()
        exe = trtllm_build_executable()
        checkpoint_dir, engine_dir = Path(checkpoint_dir), Path(engine_dir)
        problems = validate_checkpoint(checkpoint_dir)
        if problems:
            raise PipelineError(f"checkpoint {checkpoint_dir} is inconsistent: {problems[0]}")
        ckpt = json.loads((checkpoint_dir / "config.json").read_text())
        # TensorRT-LLM builds beams itself: the limits are checked as the cpu backend checks them, beam width aside.
        limits = resolve_limits({**build_config, "max_beam_width": 1}, ckpt)
        limits["max_beam_width"] = int(build_config["max_beam_width"])
        world = ckpt["mapping"]["world_size"]
        engine_dir.mkdir(parents=True, exist_ok=True)
        cmd = [exe, *trtllm_build_flags(checkpoint_dir, engine_dir / ENGINE_SUBDIR, limits, world,
                                        list(build_config.get("trtllm_args") or []))]
        started = time.perf_counter()
        log_path = engine_dir / LOG_FILE
        with log_path.open("w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise PipelineError(f"trtllm-build failed with exit code {proc.returncode} (log: {log_path}): {tail[0]}")
        built = engine_dir / ENGINE_SUBDIR
        missing = [f"rank{r}.engine" for r in range(world) if not (built / f"rank{r}.engine").is_file()]
        if missing or not (built / "config.json").is_file():
            raise PipelineError(f"trtllm-build finished but {built} lacks {(missing or ['config.json'])[0]} "
                                f"(log: {log_path})")
        config = {"version": f"trtllm-pipeline {__version__}", "pretrained_config": ckpt, "build_config": limits,
                  "engine": {"backend": self.name, "format_version": 1}}
        validate(config, "engine_config", what="engine config.json")
        (engine_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (engine_dir / "trtllm.json").write_text(json.dumps({"tensorrt_llm": version, "command": cmd}, indent=2) + "\n")
        if (checkpoint_dir / "tokenizer").is_dir():
            shutil.copytree(checkpoint_dir / "tokenizer", engine_dir / "tokenizer")
        return {"engine_bytes": sum(p.stat().st_size for p in built.glob("rank*.engine")),
                "build_seconds": round(time.perf_counter() - started, 3), "tensorrt_llm_version": version}


BACKEND = TrtllmBackend()
