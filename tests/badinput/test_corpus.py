"""Every bad input ends in exactly one `error:` line naming what is wrong, exit code 2, no traceback, nothing
published in the cache and nothing left in temp directories. The rows are in cases.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.badinput.cases import CASES, Case
from tests.badinput.conftest import copy_model, has
from tests.badinput.harness import invoke

# Cases run in-process (tests/badinput/harness.py); a few also as a real console-script process
# (test_subprocess.py) to show the two agree.


def arguments(case: Case, work: Path) -> list[str]:
    fill = {"work": work, "model": work / "model"}
    own = [o.format(**fill) for o in case.overrides]
    if case.entry == "run":
        return own
    base = ["model=hf_local", f"model.path={work / 'model'}"] if case.base == "hf" else []
    # the row's own overrides come last: Hydra applies overrides in order
    return [*base, f"cache_dir={work / 'cache'}", "progress=false", f"hydra.run.dir={work / 'run'}",
            f"stages={case.stages}", "build.smoke_test_tokens=0", "build.max_input_len=64", "build.max_seq_len=128",
            *own]


def prepare(case: Case, work: Path, fixtures) -> None:
    for need in case.needs:
        if not has(need):
            pytest.skip(f"{case.id} needs {need}")
    if case.base == "hf":
        copy_model(fixtures.llama, work / "model")
    case.make(work, fixtures)


def published(cache: Path) -> list[str]:
    """Published entries: any directory under a stage directory that is not a temp."""
    if not cache.exists():
        return []
    return [f"{s.name}/{d.name}" for s in cache.iterdir() if s.is_dir() for d in s.iterdir()
            if d.is_dir() and not d.name.startswith(".")]


def leftovers(cache: Path, temp: Path) -> list[str]:
    found = [str(p) for p in cache.rglob(".tmp-*")] if cache.exists() else []
    found += [str(p) for pattern in ("*.lock", "*.lease") for p in cache.rglob(pattern)] if cache.exists() else []
    return found + [str(p) for p in temp.iterdir()]


def check(case: Case, work: Path, code: int, stderr: str, stdout: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"{case.id}: expected one error line, got:\n{stderr}"
    assert "Traceback" not in stderr + stdout, f"{case.id}:\n{stderr}"
    fragment = case.fragment.format(work=work, model=work / "model")
    assert fragment in errors[0], f"{case.id}: {errors[0]!r} lacks {fragment!r}"
    assert code == 2, f"{case.id}: exit code {code}\n{stderr}"
    assert published(work / "cache") == [], f"{case.id}: published {published(work / 'cache')}"


def run_in_process(case: Case, work: Path):
    temp = work / "tmp"
    temp.mkdir()
    if case.entry == "run":
        import contextlib
        import io

        from pipeline import run

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run.main(arguments(case, work))
        return code, err.getvalue(), out.getvalue(), temp
    result = invoke(arguments(case, work), temp_dir=temp)
    return result.code, result.stderr, result.stdout, temp


def test_the_corpus_is_large_and_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40
    categories = {i.split("/")[0] for i in ids}
    assert {"safetensors", "index", "tensor", "config", "bin", "gguf", "mapping", "quant", "build", "dataset",
            "engine", "recipe", "nemo", "megatron", "deepspeed", "jax", "trtllm", "modelopt"} <= categories


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error(case, corpus_fixtures, tmp_path):
    work = tmp_path / "case"
    work.mkdir()
    prepare(case, work, corpus_fixtures)
    code, stderr, stdout, temp = run_in_process(case, work)
    check(case, work, code, stderr, stdout)
    assert leftovers(work / "cache", temp) == [], case.id
