"""A few corpus rows through the installed console script's process (`python -m pipeline.cli`), to show the
in-process harness gives the same result as a user's shell."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.badinput.cases import CASES
from tests.badinput.test_corpus import arguments, check, leftovers, prepare
from tests.hardening.common import REPO

SAMPLE = ("tensor/nan", "recipe/wrong_type")


@pytest.mark.parametrize("case_id", SAMPLE)
def test_console_script_process_agrees_with_the_harness(case_id, corpus_fixtures, tmp_path):
    case = next(c for c in CASES if c.id == case_id)
    work = tmp_path / "case"
    work.mkdir()
    temp = work / "tmp"
    temp.mkdir()
    prepare(case, work, corpus_fixtures)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(temp)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *arguments(case, work)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    check(case, work, proc.returncode, proc.stderr, proc.stdout)
    assert leftovers(work / "cache", temp) == []
