"""The cpu backend's build: limits checked, engine config validated, engine files self-contained."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from pipeline.engine.limits import resolve_limits
from pipeline.errors import PipelineError
from pipeline.schemas import schema_errors
from tests.runtime.engines import BUILD, build_engine

CKPT = {"max_position_embeddings": 128, "rotary_scaling": None}


@pytest.mark.parametrize("override,ckpt,message", [
    ({"max_input_len": 100, "max_seq_len": 64}, CKPT, "max_input_len=100 exceeds build.max_seq_len=64"),
    ({"max_seq_len": 256}, CKPT, "max_seq_len=256 exceeds what the model supports"),
    ({"max_beam_width": 0}, CKPT, "max_beam_width=0 must be >= 1"),
    ({"max_batch_size": 0}, CKPT, "max_batch_size=0"),
    ({}, {"max_position_embeddings": 128, "rotary_scaling": {"type": "yarn", "factor": 2.0}}, "'yarn' is not supported"),
])
def test_impossible_limits_are_rejected(override, ckpt, message):
    with pytest.raises(PipelineError, match=message):
        resolve_limits({**BUILD, **override}, ckpt)


def test_rope_scaling_extends_the_allowed_sequence_length():
    ckpt = {"max_position_embeddings": 128, "rotary_scaling": {"type": "linear", "factor": 2.0}}
    assert resolve_limits({**BUILD, "max_seq_len": 256}, ckpt)["max_seq_len"] == 256
    assert resolve_limits({**BUILD, "max_seq_len": None}, ckpt)["max_seq_len"] == 256
    assert resolve_limits({**BUILD, "max_num_tokens": None}, CKPT)["max_num_tokens"] == 4 * 32


def test_engine_directory(tiny_models, tmp_path):
    engine = build_engine(tiny_models["qwen2_bias"], tmp_path, tp=2)
    config = json.loads((engine / "config.json").read_text())
    assert schema_errors(config, "engine_config") == []
    assert config["build_config"]["max_seq_len"] == 64 and config["pretrained_config"]["mapping"]["tp_size"] == 2
    for rank in range(2):
        with safe_open(str(engine / f"rank{rank}.engine"), "pt") as f:
            meta = json.loads(f.metadata()["engine"])
            names = set(f.keys())
            assert meta["rank"] == rank and meta["model"]["qkv_bias"] and not meta["model"]["dense_bias"]
            # fc and gate fused into one matrix: rows = 2 * intermediate / tp
            assert f.get_slice("layers.0.mlp.fc_gate_weight").get_shape() == [96, 64]
    assert "layers.0.attn.dense_bias" not in names and "layers.0.attn.qkv_bias" in names


def test_build_refuses_an_inconsistent_checkpoint(tiny_models, tmp_path):
    from pipeline.engine.cpu import BACKEND

    engine = build_engine(tiny_models["llama_mha_tied"], tmp_path)
    ckpt = tmp_path / "ckpt"
    (ckpt / "rank0.safetensors").unlink()
    with pytest.raises(PipelineError, match="rank0.safetensors: missing"):
        BACKEND.build(ckpt, tmp_path / "again", BUILD)
    assert engine.exists()
