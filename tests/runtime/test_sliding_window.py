"""Sliding-window layers keep a ring KV cache of window + max_input_len slots, independent of max_seq_len; outputs
equal transformers for generations far longer than the window and the ring (so it wraps), with padded batches and
with the prefill chunked by max_num_tokens; TPxPP equals single rank."""

from __future__ import annotations

import pytest
import torch

from pipeline.runtime import ModelRunner
from tests.conftest import make_tiny_model, needs_mpirun
from tests.runtime.engines import build_engine
from tests.runtime.test_parity import PROMPTS, hf_greedy, hf_model

# max_input_len 16 with windows 4..6: rings of 20..22 slots, wrapped by 12-token prompts + 24 tokens
LIMITS = dict(max_input_len=16, max_seq_len=64)
MODELS = {
    "mistral_window_6": ("mistral_mqa", dict(sliding_window=6)),
    "qwen2_window_5_from_layer_1": ("qwen2_bias", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "gemma2_softcap": ("gemma2_softcap", {}),  # window 4 on alternate layers
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sliding")
    return {name: make_tiny_model(root, base, **over) for name, (base, over) in MODELS.items()}


@pytest.mark.parametrize("name,max_num_tokens", [(m, None) for m in MODELS] + [("mistral_window_6", 16)],
                         ids=[*MODELS, "mistral_prefill_chunked_by_rows"])
def test_ring_cache_generations_past_the_window_match_transformers(models, tmp_path, name, max_num_tokens):
    runner = ModelRunner.from_dir(build_engine(models[name], tmp_path, max_num_tokens=max_num_tokens, **LIMITS))
    a = runner.args
    window = a.sliding_window
    sizes = [c.k.shape[2] for c in runner.model.caches]
    assert sizes == [window + 16 if a.is_sliding(g) else 64 for g in a.layers] and min(sizes) < 64
    ref = hf_model(models[name])
    n = 24
    out = runner.generate([torch.tensor(p) for p in PROMPTS], max_new_tokens=n, end_id=-1, pad_id=0, return_dict=True)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            want = ref(torch.tensor([prompt])).logits[0]
        assert (out["context_logits"][i, : len(prompt)] - want).abs().max().item() < 1e-4, name
        assert out["output_ids"][i, 0, len(prompt): len(prompt) + n].tolist() == hf_greedy(ref, prompt, n), (name, i)


@needs_mpirun
def test_ring_cache_tp2_pp2_equals_single_rank(models, tmp_path):
    from tests.runtime.test_multirank import generate_on_ranks

    model, limits = models["mistral_window_6"], dict(max_input_len=12, max_seq_len=64)  # ring of 18 < 12 + 10 tokens
    single = generate_on_ranks(build_engine(model, tmp_path / "one", **limits), tmp_path / "o1", 1)[0]
    for got in generate_on_ranks(build_engine(model, tmp_path / "four", tp=2, pp=2, **limits), tmp_path / "o4", 4):
        assert torch.equal(got["output_ids"], single["output_ids"])
        assert (got["context_logits"] - single["context_logits"]).abs().max().item() < 1e-5
