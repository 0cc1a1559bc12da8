"""The cpu backend's build: limits checked, engine config validated, engine files self-contained."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from pipeline.engine.limits import model_max_seq_len, resolve_limits
from pipeline.errors import PipelineError
from pipeline.schemas import schema_errors
from tests.runtime.engines import BUILD, build_engine

CKPT = {"max_position_embeddings": 128, "rotary_scaling": None}


@pytest.mark.parametrize("override,ckpt,message", [
    ({"max_input_len": 100, "max_seq_len": 64}, CKPT, "max_input_len=100 exceeds build.max_seq_len=64"),
    ({"max_seq_len": 256}, CKPT, "max_seq_len=256 exceeds what the model supports"),
    ({"max_beam_width": 0}, CKPT, "max_beam_width=0 must be >= 1"),
    ({"max_batch_size": 0}, CKPT, "max_batch_size=0"),
    ({}, {"max_position_embeddings": 128, "rotary_scaling": {"type": "mrope", "factor": 2.0}}, "'mrope' is not supported"),
])
def test_impossible_limits_are_rejected(override, ckpt, message):
    with pytest.raises(PipelineError, match=message):
        resolve_limits({**BUILD, **override}, ckpt)


def test_rope_scaling_extends_the_allowed_sequence_length():
    ckpt = {"max_position_embeddings": 128, "rotary_scaling": {"type": "linear", "factor": 2.0}}
    assert resolve_limits({**BUILD, "max_seq_len": 256}, ckpt)["max_seq_len"] == 256
    assert resolve_limits({**BUILD, "max_seq_len": None}, ckpt)["max_seq_len"] == 256
    assert resolve_limits({**BUILD, "max_num_tokens": None}, CKPT)["max_num_tokens"] == 4 * 32


def test_unset_limits_follow_the_model_as_trtllm_build_derives_them():
    unset = {**BUILD, "max_input_len": None, "max_seq_len": None, "max_num_tokens": None}
    limits = resolve_limits(unset, {"max_position_embeddings": 256})
    assert (limits["max_seq_len"], limits["max_input_len"], limits["max_num_tokens"]) == (256, 256, 4 * 256)
    limits = resolve_limits(unset, {"max_position_embeddings": 8192})
    assert (limits["max_seq_len"], limits["max_input_len"]) == (8192, 1024)  # trtllm-build's default input length
    assert resolve_limits(unset, {})["max_seq_len"] == 2048
    # longrope and llama3 configs already state the long length: their factor does not multiply it
    for kind in ("longrope", "llama3"):
        assert model_max_seq_len({"max_position_embeddings": 512, "rotary_scaling": {"type": kind, "factor": 4.0}})[0] == 512
    # yarn (type or rope_type) stretches it, rounded up as trtllm-build's math.ceil(max_position_embeddings x factor)
    for key in ("type", "rope_type"):
        yarn = {"max_position_embeddings": 2047, "rotary_scaling": {key: "yarn", "factor": 2.5,
                                                                   "original_max_position_embeddings": 2047}}
        assert resolve_limits(unset, yarn)["max_seq_len"] == 5118


def test_explicit_limit_errors_say_once_where_the_bound_comes_from():
    with pytest.raises(PipelineError) as e:
        resolve_limits({**BUILD, "max_input_len": 924, "max_seq_len": 1024}, {"max_position_embeddings": 256})
    message = str(e.value)
    assert "build.max_seq_len=1024 exceeds what the model supports (max_position_embeddings=256)" in message
    assert message.count("256") == 1
    scaled = {"max_position_embeddings": 128, "rotary_scaling": {"type": "linear", "factor": 2.0}}
    with pytest.raises(PipelineError, match=r"\(max_position_embeddings=128 x linear rope scaling factor 2 = 256\)"):
        resolve_limits({**BUILD, "max_seq_len": 300}, scaled)
    with pytest.raises(PipelineError, match=r"max_input_len=300 exceeds the max_seq_len the model supports "
                                            r"\(max_position_embeddings=128\)"):
        resolve_limits({**BUILD, "max_input_len": 300, "max_seq_len": None}, {"max_position_embeddings": 128})


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
