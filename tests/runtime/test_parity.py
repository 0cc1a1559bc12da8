"""The fp32 CPU engine against transformers on the same weights: context logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from pipeline.runtime import ModelRunner
from tests.runtime.engines import build_engine

PROMPTS = [[5, 17, 3, 9, 22, 41, 7], [11, 2], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 12], [8, 8, 8, 1]]
MODELS = ["llama_gqa_untied", "llama_mha_tied", "mistral_mqa", "qwen2_bias", "gpt2", "gpt_bigcode_mqa", "gpt_neox", "phi", "gptj", "gemma", "gemma2_softcap",
          "gemma2_no_softcap", "gemma3", "opt_pre_norm", "opt_post_norm", "opt_proj",
          "falcon_mha_sequential", "falcon_mqa_parallel", "falcon_new_arch", "mixtral_4e_top2", "mixtral_8e_top1_mqa", "mpt"]


def hf_model(model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def engines(tiny_models, tmp_path_factory):
    return {m: build_engine(tiny_models[m], tmp_path_factory.mktemp(m)) for m in MODELS}


@pytest.mark.parametrize("model", MODELS)
def test_context_logits_and_greedy_tokens_match_transformers(tiny_models, engines, model):
    runner = ModelRunner.from_dir(engines[model])
    ref = hf_model(tiny_models[model])
    n = 12
    out = runner.generate([torch.tensor(p) for p in PROMPTS], max_new_tokens=n, end_id=-1, pad_id=0, return_dict=True,
                          output_generation_logits=True)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            want = ref(torch.tensor([prompt])).logits[0]
        got = out["context_logits"][i, : len(prompt)]
        assert (got - want).abs().max().item() < 1e-4, model
        tokens = out["output_ids"][i, 0, len(prompt): out["sequence_lengths"][i, 0]].tolist()
        assert tokens == hf_greedy(ref, prompt, n), f"{model} prompt {i}"
        # the first generation logits are the last context position's
        assert torch.allclose(out["generation_logits"][i, 0, 0], want[-1], atol=1e-4)


def test_output_layout(tiny_models, engines):
    runner = ModelRunner.from_dir(engines["llama_gqa_untied"])
    out = runner.generate([torch.tensor(p) for p in PROMPTS], max_new_tokens=5, end_id=-1, pad_id=0)
    assert out.shape == (len(PROMPTS), 1, max(map(len, PROMPTS)) + 5)
    for i, p in enumerate(PROMPTS):
        assert out[i, 0, : len(p)].tolist() == p  # each row starts with its own prompt
        assert (out[i, 0, len(p) + 5:] == -1).all()  # then padding with end_id


@pytest.mark.parametrize("model", ["llama_gqa_untied", "mixtral_4e_top2"])
@pytest.mark.parametrize("dtype,hf_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_precision_tokens_mostly_agree(tiny_models, tmp_path, dtype, hf_dtype, model):
    """Tolerance: at least 3 of 4 prompts give identical greedy continuations (8 tokens) in the same dtype;
    rounding in a different operation order may flip a near-tie (Mixtral: the engine routes in float32 as
    TensorRT-LLM does, transformers computes router logits in the model dtype)."""
    engine = build_engine(tiny_models[model], tmp_path, dtype=dtype)
    runner = ModelRunner.from_dir(engine)
    ref = hf_model(tiny_models[model], hf_dtype)
    out = runner.generate([torch.tensor(p) for p in PROMPTS], max_new_tokens=8, end_id=-1, pad_id=0)
    same = sum(out[i, 0, len(p): len(p) + 8].tolist() == hf_greedy(ref, p, 8) for i, p in enumerate(PROMPTS))
    assert same >= 3
