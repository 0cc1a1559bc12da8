"""A new user's first run on a model with few positions: the default build limits follow the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # the default model's tokenizer


def test_default_recipe_runs_end_to_end_on_a_128_position_gpt2(smollm2_gguf, tmp_path):
    from transformers import AutoTokenizer

    from tests.conftest import make_tiny_model

    model_dir = make_tiny_model(tmp_path, "gpt2", vocab_size=49152)  # n_positions=128
    AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).save_pretrained(model_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "model=hf_local", f"model.path={model_dir}",
                           f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", "progress=false",
                           "evaluate.max_ite=2", "evaluate.batch_size=1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    engine = Path(record["stages"]["build"]["artifact"])
    limits = json.loads((engine / "config.json").read_text())["build_config"]
    assert (limits["max_seq_len"], limits["max_input_len"]) == (128, 128)
    artifact = Path(record["stages"]["evaluate"]["artifact"])
    assert json.loads((artifact / "report.json").read_text())["n"] == 2
    rows = [json.loads(line) for line in (artifact / "outputs.jsonl").read_text().splitlines()]
    # prompts truncated (from the left, as summarize.py does) to leave output_len=100 within the 128 positions
    assert len(rows) == 2 and max(r["prompt_tokens"] for r in rows) == 128 - 100
