"""Pipeline-stage layer assignment and mapping checks."""

from __future__ import annotations

import pytest
import torch

from pipeline.checkpoint.layout import LLAMA_LAYOUT, check_fits, plan, pp_layers
from pipeline.errors import PipelineError


@pytest.mark.parametrize("layers,pp", [(3, 2), (30, 4), (7, 7), (5, 3), (8, 1)])
def test_pp_layers_follow_tensor_split(layers, pp):
    want = [t.tolist() for t in torch.tensor_split(torch.arange(layers), pp)]
    assert [list(pp_layers(layers, pp, r)) for r in range(pp)] == want


def config(**kw):
    base = dict(architecture="LlamaForCausalLM", dtype="float32", hidden_size=16, num_attention_heads=4,
                num_key_value_heads=2, head_size=4, intermediate_size=32, vocab_size=10, num_hidden_layers=3,
                mapping={"world_size": 1, "tp_size": 1, "pp_size": 1})
    base.update(kw)
    return base


def test_plan_places_embedding_first_and_head_last():
    plans = plan(config(mapping={"world_size": 2, "tp_size": 1, "pp_size": 2}), LLAMA_LAYOUT)
    first, last = ([t.name for t in p.tensors] for p in plans)
    assert first[0] == "transformer.vocab_embedding.weight" and "lm_head.weight" not in first
    assert last[-2:] == ["transformer.ln_f.weight", "lm_head.weight"] and "transformer.vocab_embedding.weight" not in last
    assert "transformer.layers.1.mlp.proj.weight" in first and "transformer.layers.1.mlp.proj.weight" not in last
    assert plans[1].layers == range(2, 3)


@pytest.mark.parametrize("kw,message", [
    (dict(mapping={"world_size": 3, "tp_size": 3, "pp_size": 1}), "num_attention_heads=4 is not divisible"),
    (dict(num_key_value_heads=3, num_attention_heads=6, head_size=4, hidden_size=24,
          mapping={"world_size": 2, "tp_size": 2, "pp_size": 1}), "num_key_value_heads=3"),
    (dict(mapping={"world_size": 4, "tp_size": 1, "pp_size": 4}), "pp_size=4 exceeds num_hidden_layers=3"),
])
def test_check_fits(kw, message):
    with pytest.raises(PipelineError, match=message):
        check_fits(config(**kw))
