# Sourced by the shell benchmarks: PY, the interpreter that runs the pipeline (with its dependencies), and BIN, its
# scripts folder (the console script `trtllm-pipeline`). $BENCH_PYTHON if set (not $PYTHON, which scripts/setup.sh
# reads as the interpreter to make .venv from), else the project's virtual environment that scripts/setup.sh makes
# (<repo>/.venv), else python3 on PATH (an activated environment).
_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n "${BENCH_PYTHON:-}" ]]; then PY=$BENCH_PYTHON
elif [[ -x "$_repo/.venv/bin/python" ]]; then PY=$_repo/.venv/bin/python
else PY=$(command -v python3)
fi
BIN=$(dirname "$PY")
"$PY" -c "import hydra" 2>/dev/null || {
  echo "$PY cannot import the pipeline's dependencies: run scripts/setup.sh, or set BENCH_PYTHON to one that can" >&2
  exit 1
}
