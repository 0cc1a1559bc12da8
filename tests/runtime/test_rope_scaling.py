"""Every RoPE scaling TensorRT-LLM builds, against transformers on tiny Llamas whose prompts and generations run past
the model's (original) positions, so the scaled range is exercised: context logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from pipeline.runtime import ModelRunner
from tests.conftest import make_tiny_model, needs_mpirun
from tests.runtime.engines import build_engine
from tests.runtime.test_parity import hf_greedy, hf_model

HALF = 4  # rotary_dim / 2 of llama_gqa_untied (head size 8)
SCALINGS = {
    "linear": dict(max_position_embeddings=32, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}),
    # the base grows with the sequence once it passes max_position_embeddings=32
    "dynamic": dict(max_position_embeddings=32, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5000.0}),
    "yarn": dict(max_position_embeddings=64, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 5000.0,
                                                             "original_max_position_embeddings": 16, "beta_fast": 8.0,
                                                             "beta_slow": 1.0}),
    "llama3": dict(max_position_embeddings=64, rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5000.0,
                                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                               "original_max_position_embeddings": 16}),
    # short factors up to 24 positions, long ones beyond: attention factor from 64 / 24
    "longrope": dict(max_position_embeddings=64, rope_parameters={"rope_type": "longrope", "rope_theta": 5000.0,
                                                                 "original_max_position_embeddings": 24,
                                                                 "short_factor": [1.0, 1.2, 1.5, 2.0][:HALF],
                                                                 "long_factor": [1.0, 2.0, 4.0, 8.0][:HALF]}),
}
# one prompt inside the original range that generates past it, one that starts beyond it
PROMPTS = [list(range(3, 23)), [(7 * i) % 97 + 1 for i in range(40)]]


def tiny_phi3(root, **overrides):
    """Phi-3 with partial rotary (half of each 16-wide head: 4 frequencies), fused qkv and gate_up projections."""
    import transformers

    config = transformers.Phi3Config(**{**dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                               num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5,
                                               max_position_embeddings=64, tie_word_embeddings=False,
                                               bos_token_id=0, eos_token_id=0, pad_token_id=0), **overrides})
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p))
    model.save_pretrained(root / "phi3")
    return root / "phi3"


PHI3 = {
    "phi3_partial_rotary": {},
    # Phi-3's longrope: original_max_position_embeddings at the top level of its config
    "phi3_longrope": dict(original_max_position_embeddings=24,
                          rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6],
                                        "long_factor": [1.0, 3.0, 5.0, 9.0]}),
}


def check_against_transformers(runner, ref, n=16):
    for prompt in PROMPTS:
        out = runner.generate([torch.tensor(prompt)], max_new_tokens=n, end_id=-1, pad_id=0, return_dict=True)
        with torch.no_grad():
            want = ref(torch.tensor([prompt])).logits[0]
        assert (out["context_logits"][0, : len(prompt)] - want).abs().max().item() < 1e-4
        assert out["output_ids"][0, 0, len(prompt):].tolist() == hf_greedy(ref, prompt, n)


@pytest.mark.parametrize("name", list(PHI3))
def test_phi3_partial_rotary_and_longrope_match_transformers(tmp_path, name):
    model_dir = tiny_phi3(tmp_path, **PHI3[name])
    engine = build_engine(model_dir, tmp_path / "e", max_batch_size=1, max_input_len=48, max_seq_len=64)
    runner = ModelRunner.from_dir(engine)
    assert runner.args.rotary_dim == 8 and runner.args.head_size == 16
    check_against_transformers(runner, hf_model(model_dir))


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_rope_scaling_matches_transformers_beyond_the_original_length(tmp_path, kind):
    model_dir = make_tiny_model(tmp_path, "llama_gqa_untied", **SCALINGS[kind])
    engine = build_engine(model_dir, tmp_path / "e", max_batch_size=1, max_input_len=48, max_seq_len=64)
    runner = ModelRunner.from_dir(engine)
    assert runner.args.rotary_scaling["rope_type"] == kind
    check_against_transformers(runner, hf_model(model_dir))


@needs_mpirun
def test_length_dependent_scaling_tp2_pp2_equals_single_rank(tmp_path):
    from tests.runtime.test_multirank import generate_on_ranks

    # 12-token prompts + 10 tokens pass max_position_embeddings=16: the dynamic base grows while decoding
    model = make_tiny_model(tmp_path, "llama_gqa_untied", max_position_embeddings=16,
                            rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 5000.0})
    single = generate_on_ranks(build_engine(model, tmp_path / "one"), tmp_path / "o1", 1)[0]
    for got in generate_on_ranks(build_engine(model, tmp_path / "four", tp=2, pp=2), tmp_path / "o4", 4):
        assert torch.equal(got["output_ids"], single["output_ids"])
        assert (got["context_logits"] - single["context_logits"]).abs().max().item() < 1e-5
