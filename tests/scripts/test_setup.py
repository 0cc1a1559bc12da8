"""scripts/setup.sh as a user meets it: a clean clone, the system's externally managed python3 first on PATH, nothing
activated; then the README's commands from the project's .venv. Plus the up-front checks, on fakes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, SYSTEM_PYTHON, user_environment

README = (REPO / "README.md").read_text()


def readme_commands() -> list[str]:
    """The two commands the README opens with."""
    block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    run, test = readme_commands()
    assert run == "bash scripts/setup.sh && .venv/bin/trtllm-pipeline"
    assert test == "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [test]


def test_setup_from_an_externally_managed_python_then_the_default_recipe(clean_clone_setup, tmp_path):
    clone, first = clean_clone_setup
    assert f"creating .venv with {SYSTEM_PYTHON}" in first.stdout
    assert "externally-managed" not in first.stderr
    venv_python = clone / ".venv" / "bin" / "python"
    prefix = subprocess.run([str(venv_python), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True)
    assert Path(prefix.stdout.strip()) == clone / ".venv"

    # A second run is quick and changes nothing: no pip, the stamp untouched.
    stamp = clone / ".venv" / ".setup-stamp"
    before = (stamp.stat().st_mtime_ns, sorted(p.name for p in (clone / ".venv" / "bin").iterdir()))
    again = subprocess.run(["bash", "scripts/setup.sh"], cwd=clone, env=user_environment(), capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == ".venv is up to date" and again.stderr == ""
    assert (stamp.stat().st_mtime_ns, sorted(p.name for p in (clone / ".venv" / "bin").iterdir())) == before

    # The README's first command, up to its first stage: the default recipe (the packaged SmolLM2 GGUF) converts.
    run, _ = readme_commands()
    command = run.split("&&", 1)[1].split()
    proc = subprocess.run([*command, "stages=[convert]", "progress=false", f"cache_dir={tmp_path / 'cache'}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=clone, env=user_environment(),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    convert = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["convert"]
    assert (Path(convert["artifact"]) / "rank0.safetensors").is_file()


# -- the checks before anything is installed (a copy of the script in an empty project: nothing may be created) -----

@pytest.fixture
def project(tmp_path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def setup(project: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/bash", "scripts/setup.sh"], cwd=project, env={**user_environment(), **env},
                          capture_output=True, text=True, timeout=120)


def fake_python(project: Path, site: str) -> Path:
    """The system python3 with a sitecustomize that changes what the checks see."""
    (project / "fake").mkdir()
    (project / "fake" / "sitecustomize.py").write_text(site)
    wrapper = project / "fake" / "python3"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{project / "fake"}" exec {SYSTEM_PYTHON} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


needs_system_python = pytest.mark.skipif(not SYSTEM_PYTHON.is_file(), reason=f"{SYSTEM_PYTHON} is not installed")


@needs_system_python
def test_too_old_python_is_one_line_naming_the_package(project):
    python = fake_python(project, "import sys\nsys.version_info = (3, 9, 18, 'final', 0)\n")
    proc = setup(project, PYTHON=str(python))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"error: {python} is Python 3.9; this project needs Python >= 3.10 "
        "(Debian/Ubuntu: sudo apt install python3.11 python3.11-venv)"]
    assert not (project / ".venv").exists()


@needs_system_python
def test_missing_venv_module_is_one_line_naming_the_package(project):
    python = fake_python(project, "import sys\nsys.modules['ensurepip'] = None\n")
    proc = setup(project, PYTHON=str(python))
    version = subprocess.run([str(SYSTEM_PYTHON), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"error: {python} ({version}) lacks the venv module; install it with: sudo apt install python{version}-venv"]
    assert not (project / ".venv").exists()


def test_no_python3_on_path(project, tmp_path):
    tools = tmp_path / "bin"  # a system without any python3: the shell's tools only
    tools.mkdir()
    for tool in ("cat", "rm", "ln", "pwd", "dirname"):
        if shutil.which(tool):
            (tools / tool).symlink_to(shutil.which(tool))
    proc = setup(project, PATH=str(tools), PYTHON="python3")
    assert proc.returncode != 0 and "python3 is not on PATH" in proc.stderr and "apt install" in proc.stderr


def test_an_active_environment_is_used_but_never_replaces_a_real_venv(project, tmp_path):
    active = tmp_path / "active"
    (active / "bin").mkdir(parents=True)
    (active / "bin" / "python").symlink_to(shutil.which("python3") or SYSTEM_PYTHON)
    (project / ".venv").mkdir()
    proc = setup(project, VIRTUAL_ENV=str(active))
    assert proc.returncode != 0
    assert proc.stderr.strip() == (f"error: the virtual environment {active} is active but .venv already exists; "
                                   "run 'deactivate' first, or remove .venv")
    assert (project / ".venv").is_dir() and not (project / ".venv").is_symlink()
