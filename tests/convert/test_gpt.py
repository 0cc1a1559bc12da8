"""GPT-2 (Conv1D, fused c_attn) and GPT-BigCode (multi-query) written as TensorRT-LLM's GPTForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint.validate import validate_checkpoint
from pipeline.convert.converter import convert
from pipeline.convert.registry import MappingArgs
from pipeline.convert.sources import open_source
from pipeline.schemas import schema_errors


@pytest.mark.parametrize("model,transposed,kv_heads", [("gpt2", True, 4), ("gpt_bigcode_mqa", False, 1)])
@pytest.mark.parametrize("tp", [1, 2])
def test_gpt_checkpoint(tiny_models, tmp_path, model, transposed, kv_heads, tp):
    convert(open_source("hf", tiny_models[model]), tmp_path, "float32", MappingArgs(tp, 1), progress=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert schema_errors(cfg, "checkpoint_config") == [] and validate_checkpoint(tmp_path) == []
    assert cfg["architecture"] == "GPTForCausalLM" and cfg["position_embedding_type"] == "learned_absolute"
    assert cfg["num_key_value_heads"] == kv_heads and cfg["gpt_variant"] == ("gpt2" if transposed else "starcoder")
    src = load_file(tiny_models[model] / "model.safetensors")
    h, d = 64, 16
    c_attn = src["transformer.h.1.attn.c_attn.weight"]
    full = c_attn.t() if transposed else c_attn  # (out, in) rows [Q; K; V]
    q, k, v = full[:h], full[h:h + kv_heads * d], full[h + kv_heads * d:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(tp)]
    qkv = [r["transformer.layers.1.attention.qkv.weight"] for r in ranks]
    q_rows = h // tp
    assert torch.equal(torch.cat([x[:q_rows] for x in qkv]), q)
    kv_rows = -(-kv_heads // tp) * d
    ks = [x[q_rows:q_rows + kv_rows] for x in qkv]
    vs = [x[q_rows + kv_rows:] for x in qkv]
    if kv_heads >= tp:
        assert torch.equal(torch.cat(ks), k) and torch.equal(torch.cat(vs), v)
    else:  # the single KV head is duplicated on every rank
        assert all(torch.equal(x, k) for x in ks) and all(torch.equal(x, v) for x in vs)
    fc = torch.cat([r["transformer.layers.0.mlp.fc.weight"] for r in ranks])
    want_fc = src["transformer.h.0.mlp.c_fc.weight"]
    assert torch.equal(fc, want_fc.t() if transposed else want_fc)
    for r in ranks:  # row-parallel bias: full on every rank; positions replicated; tied head = wte (padded)
        assert torch.equal(r["transformer.layers.0.mlp.proj.bias"], src["transformer.h.0.mlp.c_proj.bias"])
        assert torch.equal(r["transformer.position_embedding.weight"], src["transformer.wpe.weight"])
    head = torch.cat([r["lm_head.weight"] for r in ranks])[:97]
    assert torch.equal(head, src["transformer.wte.weight"])


@pytest.mark.parametrize("model", ["gpt_neox", "phi"])
def test_pipeline_parallelism_refused_where_tensorrt_llm_lacks_it(tiny_models, tmp_path, model):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="no pipeline parallelism"):
        convert(open_source("hf", tiny_models[model]), tmp_path, "float32", MappingArgs(1, 2), progress=False)
    assert not (tmp_path / "rank0.safetensors").exists()


@pytest.mark.parametrize("model", ["gpt_neox", "phi"])
def test_neox_and_phi_checkpoints_validate(tiny_models, tmp_path, model):
    convert(open_source("hf", tiny_models[model]), tmp_path, "bfloat16", MappingArgs(2, 1), progress=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert schema_errors(cfg, "checkpoint_config") == [] and validate_checkpoint(tmp_path) == []
    assert 0 < cfg["rotary_pct"] < 1
    rank1 = load_file(tmp_path / "rank1.safetensors")
    if model == "phi":  # lm_head bias: vocab 97 padded to 98, split in two
        assert tuple(rank1["lm_head.bias"].shape) == (49,)
    else:
        assert "transformer.layers.0.post_attention_layernorm.weight" in rank1


def test_alibi_falcon_converts_with_scaled_alibi_and_builds(tmp_path):
    from tests.conftest import make_tiny_model
    from pipeline.engine.cpu import BACKEND
    from tests.runtime.engines import BUILD

    model = make_tiny_model(tmp_path, "falcon_mqa_parallel", alibi=True)
    convert(open_source("hf", model), tmp_path / "ckpt", "float32", MappingArgs(1, 1), progress=False)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["position_embedding_type"] == "alibi_with_scale" and validate_checkpoint(tmp_path / "ckpt") == []
    BACKEND.build(tmp_path / "ckpt", tmp_path / "engine", BUILD)  # parity: tests/runtime/test_alibi.py
    engine = json.loads((tmp_path / "engine" / "config.json").read_text())
    assert engine["pretrained_config"]["position_embedding_type"] == "alibi_with_scale"


@pytest.mark.parametrize("tp", [1, 2])
def test_opt_projections_are_folded_into_embedding_and_head(tiny_models, tmp_path, tp):
    """word_embed_proj_dim (32) != hidden_size (64): TensorRT-LLM's OPT has no project_in/out; the embedding becomes
    embed @ project_in.T and the tied head embed @ project_out, both (vocab, hidden); parallel embedding off."""
    convert(open_source("hf", tiny_models["opt_proj"]), tmp_path, "float32",
            MappingArgs(tp, 1, use_parallel_embedding=True), progress=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert schema_errors(cfg, "checkpoint_config") == [] and validate_checkpoint(tmp_path) == []
    assert cfg["use_parallel_embedding"] is False and cfg["hidden_size"] == 64
    src = load_file(tiny_models["opt_proj"] / "model.safetensors")
    embed = src["model.decoder.embed_tokens.weight"]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(tp)]
    for r in ranks:
        assert torch.allclose(r["transformer.vocab_embedding.weight"], embed @ src["model.decoder.project_in.weight"].T)
        assert not any("project" in name for name in r)
    head = torch.cat([r["lm_head.weight"] for r in ranks])
    assert head.shape == (-(-97 // tp) * tp, 64)
    assert torch.allclose(head[:97], embed @ src["model.decoder.project_out.weight"])
