"""Every RoPE scaling TensorRT-LLM builds, against transformers on tiny Llamas whose prompts and generations run past
the model's (original) positions, so the scaled range is exercised: context logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from pipeline.runtime import ModelRunner
from tests.conftest import make_tiny_model
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


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_rope_scaling_matches_transformers_beyond_the_original_length(tmp_path, kind):
    model_dir = make_tiny_model(tmp_path, "llama_gqa_untied", **SCALINGS[kind])
    engine = build_engine(model_dir, tmp_path / "e", max_batch_size=1, max_input_len=48, max_seq_len=64)
    runner = ModelRunner.from_dir(engine)
    assert runner.args.rotary_scaling["rope_type"] == kind
    ref = hf_model(model_dir)
    n = 16
    for prompt in PROMPTS:
        out = runner.generate([torch.tensor(prompt)], max_new_tokens=n, end_id=-1, pad_id=0, return_dict=True)
        with torch.no_grad():
            want = ref(torch.tensor([prompt])).logits[0]
        assert (out["context_logits"][0, : len(prompt)] - want).abs().max().item() < 1e-4, kind
        assert out["output_ids"][0, 0, len(prompt):].tolist() == hf_greedy(ref, prompt, n), kind
