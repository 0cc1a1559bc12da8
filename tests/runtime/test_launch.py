"""Finding the MPI launcher for multi-rank runs: beside the interpreter, then PATH, then the mpich package; the one
of the MPI mpi4py loads; ranks run this very interpreter. And the whole path through an unactivated venv."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.runtime import launch
from tests.conftest import user_environment


def fake_mpi(prefix: Path, *names: str) -> Path:
    """An MPI installation prefix: launchers in bin/, the library in lib/."""
    (prefix / "bin").mkdir(parents=True)
    (prefix / "lib").mkdir()
    (prefix / "lib" / "libmpi.so.12").write_text("")
    for name in names:
        (prefix / "bin" / name).write_text("#!/bin/sh\n")
        (prefix / "bin" / name).chmod(0o755)
    return prefix


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Three MPI installations: one beside a (virtual environment's) interpreter, one on PATH, one in the package."""
    venv, on_path, package = tmp_path / "venv", tmp_path / "usr", tmp_path / "site" / "mpich"
    monkeypatch.setattr(sys, "executable", str(venv / "bin" / "python"))
    monkeypatch.setenv("PATH", str(on_path / "bin"))
    monkeypatch.setattr(launch, "_mpich_package_bins", lambda: [package / "bin"])
    monkeypatch.setattr(launch, "mpi4py_library", lambda: None)
    return venv, on_path, package


def test_beside_the_interpreter_first_then_path_then_the_package(places):
    venv, on_path, package = places
    fake_mpi(package, "mpirun", "mpiexec")
    assert launch.find_mpirun() == package / "bin" / "mpirun"
    fake_mpi(on_path, "mpiexec")
    assert launch.find_mpirun() == on_path / "bin" / "mpiexec"
    fake_mpi(venv, "mpirun")
    assert launch.find_mpirun() == venv / "bin" / "mpirun"


def test_the_launcher_of_the_mpi_that_mpi4py_loads(places, monkeypatch, caplog):
    venv, on_path, package = places
    fake_mpi(on_path, "mpirun")  # another MPI first on PATH (a system Open MPI, say)
    fake_mpi(package, "mpirun")
    monkeypatch.setattr(launch, "mpi4py_library", lambda: package / "lib" / "libmpi.so.12")
    with caplog.at_level(logging.DEBUG, logger="pipeline.runtime.launch"):
        assert launch.find_mpirun() == package / "bin" / "mpirun"
    assert f"MPI launcher: {package / 'bin' / 'mpirun'}" in caplog.text and "libmpi.so.12" in caplog.text


def test_no_matching_mpi_names_what_it_found(places, monkeypatch, tmp_path):
    _, on_path, _ = places
    fake_mpi(on_path, "mpirun")
    monkeypatch.setattr(launch, "mpi4py_library", lambda: tmp_path / "elsewhere" / "lib" / "libmpi.so.40")
    with pytest.raises(PipelineError, match=r"no MPI launcher matches the MPI library mpi4py loads .*elsewhere.*"
                                            r"found only .*usr/bin/mpirun"):
        launch.find_mpirun()


def test_none_found_names_where_it_looked(places):
    with pytest.raises(PipelineError) as e:
        launch.find_mpirun()
    assert f"beside {sys.executable}, on PATH or in the mpich package" in str(e.value)
    assert f"{sys.executable} -m pip install mpi4py mpich" in str(e.value)


def test_ranks_run_this_interpreter_with_the_launcher_dir_on_path(places):
    venv, _, _ = places
    fake_mpi(venv, "mpirun")
    cmd = launch.mpirun_command(2, "pipeline.run", ["--engine_dir", "e"])
    assert cmd == [str(venv / "bin" / "mpirun"), "-n", "2", sys.executable, "-m", "pipeline.run", "--engine_dir", "e"]
    env = launch.rank_environment(cmd[0])
    assert env["PATH"].split(":")[0] == str(venv / "bin") and env["PYTHONUNBUFFERED"] == "1"


def test_mpi4py_library_is_this_interpreters():
    pytest.importorskip("mpi4py")
    library = launch.mpi4py_library()
    assert library is not None and library.name.startswith("libmpi")
    assert launch.find_mpirun().resolve().parent.parent in library.parents


@pytest.fixture(scope="module")
def tiny_with_tokenizer(smollm2_gguf, tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.conftest import make_tiny_model

    model_dir = make_tiny_model(tmp_path_factory.mktemp("tiny_tok"), "llama_gqa_untied", vocab_size=49152)
    AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).save_pretrained(model_dir)
    return model_dir


def test_tp2_build_and_evaluate_from_an_unactivated_venv(unactivated_venv, tiny_with_tokenizer, tmp_path):
    """`/path/to/.venv/bin/trtllm-pipeline mapping.tp_size=2 ...` with PATH=/usr/bin:/bin: the build's smoke test and
    the evaluation run on two ranks under the venv's own mpirun."""
    assert not (Path("/usr/bin/mpirun").exists() or Path("/bin/mpirun").exists()), "a system mpirun would hide the case"
    proc = subprocess.run(
        [str(unactivated_venv / "trtllm-pipeline"), "model=hf_local", f"model.path={tiny_with_tokenizer}",
         "mapping.tp_size=2", "evaluate=tldr", "evaluate.max_ite=1", "evaluate.batch_size=2", "evaluate.output_len=4",
         "build.max_input_len=96", "build.max_seq_len=128", "evaluate.max_input_length=96", "progress=false",
         f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=user_environment(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    metrics = record["metrics"]
    assert metrics["build"]["smoke_world_size"] == 2 and metrics["convert"]["world_size"] == 2
    assert metrics["evaluate"]["n"] == 2 and metrics["evaluate"]["engine_tokens_per_second"] > 0

    # `python -m pipeline.run` with the venv's interpreter relaunches itself on both ranks the same way.
    run = subprocess.run([str(unactivated_venv / "python"), "-m", "pipeline.run", "--engine_dir",
                          record["stages"]["build"]["artifact"], "--input_ids", "1,2,3", "--max_new_tokens", "2",
                          "--json"], cwd=tmp_path, env=user_environment(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(json.loads(run.stdout.strip().splitlines()[-1])["output_ids"][0]) == 2  # a tp2 engine: ran on 2 ranks
