"""Sparse MoE (each expert on its own tokens) equals the dense formulation kept for export; engines too. Parity with
transformers and tp (moe_tp, moe_ep) against single rank run in test_parity and test_multirank with the runtime's
default, the sparse formulation."""

from __future__ import annotations

import pytest
import torch

from pipeline.runtime import ModelRunner
from pipeline.runtime.model import MoeMLP, ModelArgs
from pipeline.runtime.parallel import Dist
from tests.runtime.engines import build_engine

PROMPTS = [[5, 17, 3, 9, 22, 41, 7], [11, 2], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 12]]


def moe(num_experts=8, top_k=2, ep=1, offset=0, sparse=True) -> MoeMLP:
    args = ModelArgs(hidden_size=16, num_heads=2, num_kv_heads=2, head_size=8, intermediate_size=12, vocab_size=10,
                     num_layers=1, layers=[0], norm_eps=1e-5, hidden_act="swiglu", dtype="float32", rotary_dim=8,
                     rotary_base=10000.0, num_experts=num_experts, top_k=top_k, moe_ep_size=ep, expert_offset=offset)
    m = MoeMLP(args, Dist(), None, sparse=sparse)
    g = torch.Generator().manual_seed(offset)
    for p in m.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    return m


@pytest.mark.parametrize("top_k,ep,offset", [(2, 1, 0), (1, 1, 0), (2, 2, 4), (3, 4, 2)])
def test_sparse_equals_dense(top_k, ep, offset):
    sparse, dense = moe(top_k=top_k, ep=ep, offset=offset), moe(top_k=top_k, ep=ep, offset=offset, sparse=False)
    for tokens in (1, 3, 40):  # one token: most experts get none
        x = torch.randn(1, tokens, 16, generator=torch.Generator().manual_seed(tokens))
        with torch.no_grad():
            a, b = sparse(x), dense(x)
        assert a.shape == x.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6), (tokens, top_k, ep)


def test_expert_parallel_slices_sum_to_the_whole():
    """moe_ep: each rank's experts give a partial sum; the ranks' sums add up to the single-rank output."""
    whole = moe()
    halves = [moe(ep=2, offset=o) for o in (0, 4)]
    for h, o in zip(halves, (0, 4)):
        h.router_weight.data = whole.router_weight.data
        h.fc_weight.data, h.proj_weight.data = whole.fc_weight.data[o: o + 4], whole.proj_weight.data[o: o + 4]
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.allclose(halves[0](x) + halves[1](x), whole(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["mixtral_4e_top2", "mixtral_8e_top1_mqa"])
def test_engine_sparse_equals_dense(tiny_models, tmp_path, model):
    runner = ModelRunner.from_dir(build_engine(tiny_models[model], tmp_path))
    kw = dict(max_new_tokens=8, end_id=-1, pad_id=0, return_dict=True, output_generation_logits=True)
    sparse = runner.generate([torch.tensor(p) for p in PROMPTS], **kw)
    runner.model.set_moe_formulation(sparse=False)
    dense = runner.generate([torch.tensor(p) for p in PROMPTS], **kw)
    assert torch.equal(sparse["output_ids"], dense["output_ids"])
    for key in ("context_logits", "generation_logits"):
        assert (sparse[key] - dense[key]).abs().max().item() < 1e-5, key
