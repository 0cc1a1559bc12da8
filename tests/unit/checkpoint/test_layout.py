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


@pytest.mark.parametrize("shapes, dim", [([(4, 3), (2, 3)], 0), ([(4, 3), (4, 5), (4, 1)], 1), ([(2, 3, 4)] * 2, -1),
                                         ([(7,)], 0)])
def test_meta_concat_has_torch_cat_shape(shapes, dim):
    from pipeline.checkpoint.sharding import concat

    cpu = [torch.zeros(s, dtype=torch.float16) for s in shapes]
    meta = [torch.empty(s, dtype=torch.float16, device="meta") for s in shapes]
    got, want = concat(meta, dim), torch.cat(cpu, dim=dim)
    assert got.is_meta and got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(concat(cpu, dim), want)


def test_meta_concat_of_mismatched_shapes_is_torch_cats_error():
    from pipeline.checkpoint.sharding import concat

    with pytest.raises(RuntimeError):
        concat([torch.empty(2, 3, device="meta"), torch.empty(2, 4, device="meta")], 0)


def test_planning_every_scheme_leaves_torch_dynamo_unimported(smollm2_gguf):
    """The plan shards meta tensors; torch's meta cat and bitwise ops would import torch._dynamo (~2 s per run)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\n"
            "from tests.recipes_util import compose_recipe\n"
            "from pipeline.plan import convert_plan\n"
            "for algo in ['none', 'w8a16', 'w4a16', 'w4a16_awq', 'w4a8_awq', 'w4a16_gptq', 'fp8', 'w8a8_sq_per_channel']:\n"
            "    convert_plan(compose_recipe(['+experiment=smollm2_quant_ppl', 'quantization=' + algo]))\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n")
    root = Path(__file__).resolve().parents[3]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=300)
