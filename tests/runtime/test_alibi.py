"""ALiBi: BLOOM's slopes (also for head counts that are not a power of two), BLOOM and Falcon's alibi=true models
against transformers; tensor parallelism splits the slopes by head."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.runtime import ModelRunner
from pipeline.runtime.model import alibi_slopes
from tests.conftest import make_tiny_model
from tests.runtime.engines import build_engine
from tests.runtime.test_parity import PROMPTS, hf_greedy, hf_model

FALCON_ALIBI = {
    # 6 heads: 4 from the power-of-two series, 2 from the doubled one
    "falcon_alibi_6_heads": ("falcon_mha_sequential", dict(alibi=True, num_attention_heads=6, hidden_size=48)),
    "falcon_alibi_mqa_parallel": ("falcon_mqa_parallel", dict(alibi=True)),
}


@pytest.mark.parametrize("heads", [1, 4, 6, 12, 16, 24])
def test_slopes_are_blooms(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    # transformers' alibi at key position 1 is the slope itself
    want = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), heads, torch.float32)[:, 0, 1]
    assert torch.equal(alibi_slopes(heads), want)


def tiny_bloom(root):
    import transformers

    config = transformers.BloomConfig(vocab_size=97, hidden_size=48, n_layer=3, n_head=6, bos_token_id=0,
                                      eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p))
    model.save_pretrained(root / "bloom")
    return root / "bloom"


@pytest.fixture(scope="module")
def falcon_alibi(tmp_path_factory):
    root = tmp_path_factory.mktemp("alibi")
    models = {name: make_tiny_model(root, base, **over) for name, (base, over) in FALCON_ALIBI.items()}
    return {**models, "bloom_6_heads": tiny_bloom(root)}


@pytest.mark.parametrize("name", [*FALCON_ALIBI, "bloom_6_heads"])
def test_alibi_models_match_transformers(falcon_alibi, tmp_path, name):
    runner = ModelRunner.from_dir(build_engine(falcon_alibi[name], tmp_path))
    assert runner.args.alibi and runner.args.rotary_dim == 0
    ref = hf_model(falcon_alibi[name])
    n = 10
    out = runner.generate([torch.tensor(p) for p in PROMPTS], max_new_tokens=n, end_id=-1, pad_id=0, return_dict=True)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            want = ref(torch.tensor([prompt])).logits[0]
        assert (out["context_logits"][i, : len(prompt)] - want).abs().max().item() < 1e-4, name
        assert out["output_ids"][i, 0, len(prompt): len(prompt) + n].tolist() == hf_greedy(ref, prompt, n), name


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (pip install mpi4py mpich)")
def test_alibi_tp2_pp2_equals_single_rank(falcon_alibi, tmp_path):
    from tests.runtime.test_multirank import generate_on_ranks

    model = falcon_alibi["bloom_6_heads"]  # 3 heads per tp rank: rank 1 holds slopes 4..6; layers 2 + 1
    single = generate_on_ranks(build_engine(model, tmp_path / "one"), tmp_path / "o1", 1)[0]
    for got in generate_on_ranks(build_engine(model, tmp_path / "four", tp=2, pp=2), tmp_path / "o4", 4):
        assert torch.equal(got["output_ids"], single["output_ids"])
        assert (got["context_logits"] - single["context_logits"]).abs().max().item() < 1e-5
