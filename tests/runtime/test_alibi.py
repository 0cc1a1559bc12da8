"""ALiBi: BLOOM's slopes (also for head counts that are not a power of two), BLOOM and Falcon's alibi=true models
against transformers; tensor parallelism splits the slopes by head."""

from __future__ import annotations

import pytest
import torch

from pipeline.runtime import ModelRunner
from pipeline.runtime.model import alibi_slopes
from tests.conftest import make_tiny_model, needs_mpirun
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


@needs_mpirun
def test_alibi_tp2_pp2_equals_single_rank(falcon_alibi, tmp_path):
    from tests.runtime.test_multirank import generate_on_ranks

    model = falcon_alibi["bloom_6_heads"]  # 3 heads per tp rank: rank 1 holds slopes 4..6; layers 2 + 1
    single = generate_on_ranks(build_engine(model, tmp_path / "one"), tmp_path / "o1", 1)[0]
    for got in generate_on_ranks(build_engine(model, tmp_path / "four", tp=2, pp=2), tmp_path / "o4", 4):
        assert torch.equal(got["output_ids"], single["output_ids"])
        assert (got["context_logits"] - single["context_logits"]).abs().max().item() < 1e-5


# --- GPT with ALiBi and no position table (NeMo/Megatron GPT, position_embedding_type=alibi) -----------------------
# No transformers class has this combination, so the reference is transformers' GPT-2 on the same weights with the
# position table zeroed and an attention function (registered through transformers' AttentionInterface) that adds
# slope x (key - query) per head, the slopes taken from transformers' BLOOM: an independent computation of the same
# function (TensorRT-LLM's `alibi`: unscaled slopes added to the scaled scores, as NeMo's attention adds its bias).

def alibi_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    heads, t, s = query.shape[1], query.shape[2], key.shape[2]
    slopes = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), heads, torch.float32)[:, 0, 1]
    q_pos, k_pos = torch.arange(s - t, s)[:, None], torch.arange(s)[None, :]
    bias = slopes[:, None, None] * (k_pos - q_pos).float()
    bias = bias.masked_fill(k_pos > q_pos, float("-inf"))
    scores = torch.matmul(query, key.transpose(-1, -2)) * (scaling or query.shape[-1] ** -0.5) + bias
    out = torch.matmul(torch.softmax(scores, dim=-1), value)
    return out.transpose(1, 2), None


def gpt_alibi_reference(twin):
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register("alibi_reference", alibi_reference_attention)
    ref = AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32, attn_implementation="alibi_reference").eval()
    with torch.no_grad():
        ref.transformer.wpe.weight.zero_()
    return ref


def reference_greedy(ref, prompt, n):
    """Full forward passes (no cache): each step sees the whole sequence, as the reference attention expects."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(ref(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def nemo_alibi_gpt(tiny_models, tmp_path_factory):
    """The tiny GPT-2 as a NeMo ALiBi GPT (source tp2): same weights, no position table."""
    from tests.convert.test_nemo import megatron_dict
    from tests.convert import megatron_samples as ms

    root = tmp_path_factory.mktemp("nemo_alibi")
    hf_cfg, glob = megatron_dict("gpt", tiny_models)
    del glob["embedding.position_embeddings.weight"]
    cfg = ms.nemo_config("gpt", hf_cfg, 2, 1, position_embedding_type="alibi")
    return ms.write_nemo(root / "gpt_alibi.nemo", ms.shard(glob, 2, 1, gated=False), cfg)


def test_alibi_gpt_matches_reference(nemo_alibi_gpt, tiny_models, tmp_path):
    runner = ModelRunner.from_dir(build_engine(nemo_alibi_gpt, tmp_path, source="nemo"))
    assert runner.args.alibi and runner.args.max_positions == 0 and runner.args.alibi_scale == 1.0
    ref = gpt_alibi_reference(tiny_models["gpt2"])
    n = 10
    out = runner.generate([torch.tensor(p) for p in PROMPTS], max_new_tokens=n, end_id=-1, pad_id=0, return_dict=True)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            want = ref(torch.tensor([prompt]), use_cache=False).logits[0]
        assert (out["context_logits"][i, : len(prompt)] - want).abs().max().item() < 1e-4
        assert out["output_ids"][i, 0, len(prompt): len(prompt) + n].tolist() == reference_greedy(ref, prompt, n)


@needs_mpirun
def test_alibi_gpt_tp2_equals_single_rank(nemo_alibi_gpt, tmp_path):
    from tests.runtime.test_multirank import generate_on_ranks

    single = generate_on_ranks(build_engine(nemo_alibi_gpt, tmp_path / "one", source="nemo"), tmp_path / "o1", 1)[0]
    two = build_engine(nemo_alibi_gpt, tmp_path / "two", tp=2, source="nemo")  # 2 heads (2 slopes) per rank
    for got in generate_on_ranks(two, tmp_path / "o2", 2):
        assert torch.equal(got["output_ids"], single["output_ids"])
        assert (got["context_logits"] - single["context_logits"]).abs().max().item() < 1e-5


# --- MPT (parity with transformers: tests/runtime/test_parity.py) ---------------------------------------------------

@pytest.mark.parametrize("heads", [4, 6, 12])
@pytest.mark.parametrize("bias_max", [8, 16])
def test_slopes_with_alibi_bias_max_are_mpts(heads, bias_max):
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    want = -build_mpt_alibi_tensor(heads, 2, bias_max)[:, 0, 0]  # key position -1 relative to the query: -slope
    assert torch.allclose(alibi_slopes(heads, bias_max), want, rtol=1e-6, atol=0)


@needs_mpirun
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_mpt_tp2_and_pp2_equal_single_rank(tiny_models, tmp_path, tp, pp):
    from tests.runtime.test_multirank import generate_on_ranks

    model = tiny_models["mpt"]  # tp2: 3 heads (3 slopes) and half of each clamped qkv per rank; pp2: layers 2 + 1
    single = generate_on_ranks(build_engine(model, tmp_path / "one"), tmp_path / "o1", 1)[0]
    for got in generate_on_ranks(build_engine(model, tmp_path / "many", tp=tp, pp=pp), tmp_path / "o2", tp * pp):
        assert torch.equal(got["output_ids"], single["output_ids"])
        assert (got["context_logits"] - single["context_logits"]).abs().max().item() < 1e-5
