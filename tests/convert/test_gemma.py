"""Gemma2 and Gemma3 checkpoints: names, shapes and dtypes per rank as the spec lists them (sections 2.9 and 3), norms
stored as 1 + w, the config fields of section 1.7, and the sliding-window pattern derived from HF layer_types."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint.validate import validate_checkpoint
from pipeline.convert.archs.gemma import sliding_window_pattern
from pipeline.errors import PipelineError
from pipeline.schemas import schema_errors
from tests.convert.reassemble import stage_layers
from tests.convert.test_llama_family import assert_bf16_ranks_match_spec, run_convert

MAPPINGS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)]


def expected_rank_shapes(cfg: dict, tp: int, pp: int, pp_rank: int) -> dict[str, tuple[int, ...]]:
    """Written out by hand from the spec: no biases; the embedding split on rows when tp > 1 (Gemma forces parallel
    embedding, vocab divisible by tp); four norms per layer; q/k norms of head_size for Gemma3."""
    h, nh, nkv, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"]
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    kvl = -(-nkv // tp)
    shapes = {}
    if pp_rank == 0:
        shapes["transformer.vocab_embedding.weight"] = (vocab // tp, h)
    for j in range(len(stage_layers(cfg["num_hidden_layers"], pp)[pp_rank])):
        p = f"transformer.layers.{j}."
        for norm in ("input_layernorm", "post_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            shapes[p + norm + ".weight"] = (h,)
        if cfg["architecture"] == "Gemma3ForCausalLM":
            shapes[p + "attention.q_layernorm.weight"] = (d,)
            shapes[p + "attention.k_layernorm.weight"] = (d,)
        shapes[p + "attention.qkv.weight"] = ((nh // tp + 2 * kvl) * d, h)
        shapes[p + "attention.dense.weight"] = (h, nh * d // tp)
        shapes[p + "mlp.fc.weight"] = (inter // tp, h)
        shapes[p + "mlp.gate.weight"] = (inter // tp, h)
        shapes[p + "mlp.proj.weight"] = (h, inter // tp)
    if pp_rank == pp - 1:
        shapes["transformer.ln_f.weight"] = (h,)
        shapes["lm_head.weight"] = (vocab // tp, h)
    return shapes


@pytest.mark.parametrize("tp,pp", MAPPINGS, ids=[f"tp{t}pp{p}" for t, p in MAPPINGS])
@pytest.mark.parametrize("model", ["gemma2_softcap", "gemma3"])
def test_names_shapes_dtypes_per_rank_match_spec(tiny_models, tmp_path, model, tp, pp):
    result = run_convert(tiny_models[model], tmp_path, tp, pp, dtype="bfloat16")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert schema_errors(cfg, "checkpoint_config") == [] and validate_checkpoint(tmp_path) == []
    assert cfg["use_parallel_embedding"] is (tp > 1)
    assert_bf16_ranks_match_spec(tmp_path, cfg, result, tp, pp, expected_rank_shapes)


@pytest.mark.parametrize("model", ["gemma2_softcap", "gemma3"])
def test_norms_are_one_plus_w_under_their_trtllm_names(tiny_models, tmp_path, model):
    run_convert(tiny_models[model], tmp_path, 1, 1)
    src = load_file(tiny_models[model] / "model.safetensors")
    got = load_file(tmp_path / "rank0.safetensors")
    names = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_layernorm",
             "pre_feedforward_layernorm": "pre_feedforward_layernorm",
             "post_feedforward_layernorm": "post_feedforward_layernorm"}
    if model == "gemma3":
        names.update({"self_attn.q_norm": "attention.q_layernorm", "self_attn.k_norm": "attention.k_layernorm"})
    for layer in range(3):
        for hf, trt in names.items():
            want = src[f"model.layers.{layer}.{hf}.weight"] + 1.0
            assert torch.equal(got[f"transformer.layers.{layer}.{trt}.weight"], want), (hf, layer)
    assert torch.equal(got["transformer.ln_f.weight"], src["model.norm.weight"] + 1.0)
    assert torch.equal(got["lm_head.weight"], src["model.embed_tokens.weight"])  # raw: the sqrt(H) scale is runtime


def test_config_fields(tiny_models, tmp_path):
    run_convert(tiny_models["gemma2_softcap"], tmp_path / "g2", 1, 1)
    cfg = json.loads((tmp_path / "g2" / "config.json").read_text())
    assert cfg["architecture"] == "Gemma2ForCausalLM" and cfg["inter_layernorms"] is True
    assert (cfg["query_pre_attn_scalar"], cfg["attn_logit_softcapping"], cfg["final_logit_softcapping"]) == (24, 2.0, 3.0)
    assert (cfg["_sliding_window_pattern"], cfg["sliding_window"]) == (2, 4)
    assert cfg["head_size"] == 32 and cfg["hidden_act"] == "gelu_pytorch_tanh"
    run_convert(tiny_models["gemma3"], tmp_path / "g3", 1, 1)
    cfg = json.loads((tmp_path / "g3" / "config.json").read_text())
    assert cfg["architecture"] == "Gemma3ForCausalLM" and "attn_logit_softcapping" not in cfg
    assert (cfg["rotary_base"], cfg["rope_local_base_freq"]) == (1_000_000.0, 10_000.0)
    assert cfg["rotary_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert (cfg["_sliding_window_pattern"], cfg["sliding_window"], cfg["final_logit_softcapping"]) == (2, 4, 3.0)


def test_sliding_window_pattern_from_layer_types():
    s, g = "sliding_attention", "full_attention"
    assert sliding_window_pattern({"num_hidden_layers": 6, "sliding_window": 8, "layer_types": [s, s, g, s, s, g]}, 2) == 3
    # Gemma3's usual 6 is kept when it fits (here every layer slides)
    assert sliding_window_pattern({"num_hidden_layers": 3, "sliding_window": 8, "layer_types": [s, s, s],
                                   "sliding_window_pattern": 6}, 6) == 6
    assert sliding_window_pattern({"num_hidden_layers": 2, "sliding_window": None, "layer_types": [s, g]}, 2) == 1
    with pytest.raises(PipelineError, match="no sliding-window pattern"):
        sliding_window_pattern({"num_hidden_layers": 3, "sliding_window": 8, "layer_types": [g, s, s]}, 2)


def test_vocabulary_not_divisible_by_tp_is_refused(tmp_path):
    from tests.conftest import make_tiny_model

    model = make_tiny_model(tmp_path, "gemma3", vocab_size=97)
    with pytest.raises(PipelineError, match="not divisible by tp_size=2"):
        run_convert(model, tmp_path / "out", 2, 1)
