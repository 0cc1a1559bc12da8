"""ModelRunner behaviour: limits, sampling, stop conditions, streaming; the default model against transformers."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.runtime import ModelRunner
from pipeline.runtime.sampling import sample
from tests.runtime.engines import build_engine

PROMPTS = [[5, 17, 3, 9, 22, 41, 7], [11, 2], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 12]]


@pytest.fixture(scope="module")
def runner(tiny_models, tmp_path_factory):
    return ModelRunner.from_dir(build_engine(tiny_models["llama_gqa_untied"], tmp_path_factory.mktemp("engine")))


def batch(prompts=PROMPTS):
    return [torch.tensor(p) for p in prompts]


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_input_ids=[torch.tensor([1])] * 5), "exceeds max_batch_size=4"),
    (dict(batch_input_ids=[torch.arange(33)]), "more than max_input_len=32"),
    (dict(batch_input_ids=[torch.arange(30)], max_new_tokens=40), "exceed max_seq_len=64"),
    (dict(num_beams=2), r"num_beams=2 must be in \[1, max_beam_width=1\]"),
    (dict(batch_input_ids=[torch.tensor([1, 500])]), "outside"),
    (dict(batch_input_ids=[torch.tensor([], dtype=torch.long)]), "empty"),
])
def test_requests_beyond_limits_are_clear_errors(runner, kwargs, message):
    args = {**dict(batch_input_ids=batch(), max_new_tokens=4, end_id=-1, pad_id=0), **kwargs}
    with pytest.raises(PipelineError, match=message):
        runner.generate(**args)


def test_batched_equals_one_by_one(runner):
    together = runner.generate(batch(), max_new_tokens=6, end_id=-1, pad_id=0)
    for i, p in enumerate(PROMPTS):
        alone = runner.generate(batch([p]), max_new_tokens=6, end_id=-1, pad_id=0)
        assert together[i, 0, : len(p) + 6].tolist() == alone[0, 0, : len(p) + 6].tolist()


def test_end_id_stops_a_sequence_and_pads(runner):
    free = runner.generate(batch(), max_new_tokens=8, end_id=-1, pad_id=0, return_dict=True)
    p = PROMPTS[0]
    third = free["output_ids"][0, 0, len(p) + 2].item()  # make the third generated token of sequence 0 the end token
    out = runner.generate(batch(), max_new_tokens=8, end_id=third, pad_id=0, return_dict=True)
    first_end = next(k for k, t in enumerate(free["output_ids"][0, 0, len(p):].tolist()) if t == third)
    assert out["sequence_lengths"][0, 0].item() == len(p) + first_end
    assert (out["output_ids"][0, 0, len(p) + first_end:] == third).all()


def test_stop_words(runner):
    free = runner.generate(batch(), max_new_tokens=8, end_id=-1, pad_id=0, return_dict=True)
    p = PROMPTS[1]
    gen = free["output_ids"][1, 0, len(p): len(p) + 8].tolist()
    stop = gen[2:4]
    out = runner.generate(batch(), max_new_tokens=8, end_id=-1, pad_id=0, stop_words_list=[stop], return_dict=True)
    n = out["sequence_lengths"][1, 0].item() - len(p)
    assert out["output_ids"][1, 0, len(p): len(p) + n].tolist()[-2:] == stop and n <= 4


def test_streaming_yields_growing_outputs(runner):
    steps = list(runner.generate(batch(), max_new_tokens=5, end_id=-1, pad_id=0, streaming=True, return_dict=True))
    assert len(steps) == 5
    lengths = [s["sequence_lengths"][:, 0].tolist() for s in steps]
    assert all(b == [x + 1 for x in a] for a, b in zip(lengths, lengths[1:]))
    final = runner.generate(batch(), max_new_tokens=5, end_id=-1, pad_id=0)
    assert torch.equal(steps[-1]["output_ids"], final)


def test_seeded_sampling_is_reproducible(runner):
    kw = dict(max_new_tokens=10, end_id=-1, pad_id=0, temperature=1.5, top_k=20, top_p=0.9)
    a = runner.generate(batch(), random_seed=7, **kw)
    b = runner.generate(batch(), random_seed=7, **kw)
    c = runner.generate(batch(), random_seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_and_top_p_filter():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, 1.0, 2, 0.0, g).item() for _ in range(200)} == {0, 1}
    # probabilities ~ [0.64, 0.24, 0.09, ...]: top_p=0.8 keeps the first two
    assert {sample(logits, 1.0, 0, 0.8, g).item() for _ in range(200)} == {0, 1}
    assert sample(logits, 1.0, 1, 0.0, g).item() == 0


@pytest.mark.slow
def test_default_model_greedy_matches_transformers(smollm2_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = build_engine(smollm2_gguf, tmp_path, source="gguf", max_input_len=64, max_seq_len=128)
    runner = ModelRunner.from_dir(engine)
    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    prompts = [tok.encode(t) for t in texts]
    out = runner.generate(batch(prompts), max_new_tokens=20, end_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                          return_dict=True)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        if want and want[-1] == tok.eos_token_id:
            want = want[:-1]
        got = out["output_ids"][i, 0, len(p): out["sequence_lengths"][i, 0]].tolist()
        assert got == want, texts[i]
        with torch.no_grad():
            ctx = ref(torch.tensor([p])).logits[0]
        assert (out["context_logits"][i, : len(p)] - ctx).abs().max().item() < 1e-3
