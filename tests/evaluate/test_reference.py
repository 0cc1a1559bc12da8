"""The reference stage: computed once and reused by every engine of a sweep (3 quantizations); the statistical gate
judged from cached metrics; batched left-padded greedy generation equals one prompt at a time."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.executor import run_pipeline
from tests.recipes_util import compose_recipe

pytestmark = pytest.mark.slow  # the tokenizer comes from the default model


@pytest.fixture(scope="module")
def tiny_with_tokenizer(smollm2_gguf, tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.conftest import make_tiny_model

    root = tmp_path_factory.mktemp("tiny_ref")
    model_dir = make_tiny_model(root, "llama_gqa_untied", vocab_size=49152)
    AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).save_pretrained(model_dir)
    return model_dir


def common(model_dir) -> list[str]:
    return ["model=hf_local", f"model.path={model_dir}", "progress=false", "evaluate=tldr", "evaluate.test_hf=true",
            "evaluate.max_ite=2", "evaluate.batch_size=2", "evaluate.output_len=6", "build.max_input_len=96",
            "build.max_seq_len=128", "build.smoke_test_tokens=0", "evaluate.max_input_length=96",
            "evaluate.eval_ppl=true", "build.gather_context_logits=true", "evaluate.ppl_max_windows=2",
            "evaluate.ppl_window=48", "quantization.group_size=32"]


def test_one_reference_serves_three_quantizations(tiny_with_tokenizer, tmp_path):
    outcomes = {}
    for quant in ("none", "w8a16", "w4a16"):
        result = run_pipeline(compose_recipe([*common(tiny_with_tokenizer), f"quantization={quant}"]), tmp_path,
                              ["evaluate"], progress=False)
        outcomes[quant] = {o.name: o for o in result.stages}
    refs = [o["reference"] for o in outcomes.values()]
    assert len({r.key for r in refs}) == 1 and [r.reused for r in refs] == [False, True, True]
    assert len([p for p in (tmp_path / "reference").iterdir() if p.is_dir()]) == 1
    assert len({o["evaluate"].key for o in outcomes.values()}) == 3
    none = outcomes["none"]["evaluate"].metrics
    # the unquantized engine is transformers: same tokens, zero KL, full top-1 agreement, `same` verdict
    assert none["identical_fraction"] == 1.0 and none["kld_mean"] < 1e-5 and none["top1_agreement"] == 1.0
    assert outcomes["none"]["evaluate"].checks["verdicts"]["rouge1_vs_hf"] == "same"
    w4 = outcomes["w4a16"]["evaluate"].metrics
    assert w4["kld_mean"] > none["kld_mean"] and w4["kld_tokens"] == none["kld_tokens"] == 2 * 47
    report = json.loads((outcomes["w4a16"]["evaluate"].artifact / "report.json").read_text())
    assert report["reference_key"] == refs[0].key and report["hf"]["batch_size"] == 16
    # KL over the whole vocabulary, from the reference's full log-probs; the speed probe at batch 1 and max batch
    assert report["kld"]["kld_reference"] == "full" and (refs[0].artifact / "logprobs.safetensors").is_file()
    assert report["speed"]["batch_1"]["decode_tokens_per_second"] > 0 and w4["decode_tps_batch_n"] > 0

    # the statistical gate, judged from the cached metrics: nothing recomputes
    kld = w4["kld_mean"]
    for limit, fails in ((kld * 2, False), (kld / 2, True)):
        result = run_pipeline(compose_recipe([*common(tiny_with_tokenizer), "quantization=w4a16",
                                              "evaluate.check_accuracy=true", "evaluate.gate=statistical",
                                              f"evaluate.max_mean_kld={limit}", "evaluate.max_rouge1_drop=100"]),
                              tmp_path, ["evaluate"], progress=False)
        assert all(o.reused for o in result.stages)
        assert bool(result.failed_checks()) == fails
    assert "kld_mean" in result.failed_checks()[0] and "above evaluate.max_mean_kld" in result.failed_checks()[0]


def test_batched_reference_equals_one_at_a_time(tiny_with_tokenizer):
    from transformers import AutoModelForCausalLM

    from pipeline.evaluate.hf_eval import run_hf_eval

    model = AutoModelForCausalLM.from_pretrained(tiny_with_tokenizer, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 40000, (n,), generator=g).tolist() for n in (7, 19, 3, 12, 25)]
    request = {"prompts": prompts, "max_new_tokens": 8, "end_id": 2, "pad_id": 2, "top_k": 1, "top_p": 0.0,
               "temperature": 1.0, "random_seed": 0}
    one = run_hf_eval(model, request, batch_size=1)
    batched = run_hf_eval(model, request, batch_size=4)
    assert batched["batch_size"] == 4 and one["batch_size"] == 1
    assert batched["outputs"] == one["outputs"]
