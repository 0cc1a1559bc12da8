"""MPT written as TensorRT-LLM's MPTForCausalLM: its config fields and tensor names (those of TensorRT-LLM's MPT
conversion), the tensors against the source, and clear refusals of what its MPT model cannot express."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint.validate import validate_checkpoint
from pipeline.convert.converter import convert
from pipeline.convert.registry import MappingArgs
from pipeline.convert.sources import open_source
from pipeline.errors import PipelineError
from pipeline.schemas import schema_errors
from tests.conftest import make_tiny_model

# What TensorRT-LLM's MPT conversion writes per layer and outside the layers (no biases).
LAYER_NAMES = {"input_layernorm.weight", "attention.qkv.weight", "attention.dense.weight", "post_layernorm.weight",
               "mlp.fc.weight", "mlp.proj.weight"}
OUTER_NAMES = {"transformer.vocab_embedding.weight", "transformer.ln_f.weight", "lm_head.weight"}


@pytest.mark.parametrize("tp", [1, 2])
def test_mpt_checkpoint_names_config_and_tensors(tiny_models, tmp_path, tp):
    convert(open_source("hf", tiny_models["mpt"]), tmp_path, "float32", MappingArgs(tp, 1), progress=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert schema_errors(cfg, "checkpoint_config") == [] and validate_checkpoint(tmp_path) == []
    assert cfg["architecture"] == "MPTForCausalLM" and cfg["position_embedding_type"] == "alibi"
    assert (cfg["bias"], cfg["clip_qkv"], cfg["alibi_bias_max"], cfg["hidden_act"]) == (False, 0.15, 8, "gelu")
    assert (cfg["intermediate_size"], cfg["num_key_value_heads"], cfg["max_position_embeddings"]) == (192, 6, 128)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(tp)]
    want = OUTER_NAMES | {f"transformer.layers.{i}.{n}" for i in range(3) for n in LAYER_NAMES}
    assert all(set(r) == want for r in ranks)
    src = load_file(tiny_models["mpt"] / "model.safetensors")
    wqkv = src["transformer.blocks.2.attn.Wqkv.weight"]  # rows [Q; K; V], 48 each, 6 heads of 8
    for part in range(3):  # each rank: its 6 / tp heads of Q, then of K, then of V
        got = torch.cat([r["transformer.layers.2.attention.qkv.weight"].view(3, -1, 48)[part] for r in ranks])
        assert torch.equal(got, wqkv[48 * part: 48 * (part + 1)])
    assert torch.equal(torch.cat([r["transformer.layers.0.attention.dense.weight"] for r in ranks], 1),
                       src["transformer.blocks.0.attn.out_proj.weight"])
    assert torch.equal(ranks[0]["transformer.ln_f.weight"], src["transformer.norm_f.weight"])
    assert torch.equal(torch.cat([r["lm_head.weight"] for r in ranks])[:97], src["transformer.wte.weight"])


@pytest.mark.parametrize("override,message", [
    (dict(no_bias=False), "no_bias=false"),
    (dict(attn_config={"alibi": False}), "attn_config.alibi=false"),
    (dict(attn_config={"qk_ln": True}), "attn_config.qk_ln=true"),
    (dict(attn_config={"softmax_scale": 0.5}), "attn_config.softmax_scale=0.5"),
    (dict(logit_scale=2.0), "logit_scale=2.0"),
])
def test_inexpressible_mpt_variants_are_refused_by_name(tmp_path, override, message):
    model = make_tiny_model(tmp_path, "mpt")
    cfg = json.loads((model / "config.json").read_text())
    for key, value in override.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PipelineError, match=message):
        convert(open_source("hf", model), tmp_path / "out", "float32", MappingArgs(1, 1), progress=False)
    assert not (tmp_path / "out" / "config.json").exists()
