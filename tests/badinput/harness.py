"""Run the `trtllm-pipeline` entry point in this process, as a user's shell would, and capture what it prints.

In-process invocation gives the corpus the same guarantees as a subprocess (the console script's `main()`, Hydra's
composition and error handling, the exit code, stdout and stderr) at a fraction of the cost: torch, transformers
and the stages are imported once for all cases instead of once per case.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Invocation:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def invoke(args: list[str], temp_dir: Path | None = None) -> Invocation:
    """`trtllm-pipeline ARGS` in this process; `temp_dir` becomes the process temp directory meanwhile."""
    from hydra.core.global_hydra import GlobalHydra

    from pipeline import cli

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_tempdir = sys.argv, tempfile.tempdir
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    sys.argv = ["trtllm-pipeline", *args]
    if temp_dir is not None:
        tempfile.tempdir = str(temp_dir)
    code = 0
    _detach_absl_handler()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, tempfile.tempdir = saved_argv, saved_tempdir
        GlobalHydra.instance().clear()
        for h in list(root.handlers):  # Hydra's job logging binds handlers to the redirected streams
            if h not in saved_handlers:
                root.removeHandler(h)
        for h in saved_handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(saved_level)
    return Invocation(code, out.getvalue(), err.getvalue())


def _detach_absl_handler() -> None:
    """absl (imported by rouge_score) binds its handler to the sys.stderr of the moment it is imported: under pytest
    that can be the capture stream of collection. Hydra's logging.config.dictConfig closes every existing handler,
    and absl's would close that stream, breaking pytest's capture for the rest of the session; point it at the real
    stderr, which absl never closes."""
    absl_logging = sys.modules.get("absl.logging")
    if absl_logging is not None:
        absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__
