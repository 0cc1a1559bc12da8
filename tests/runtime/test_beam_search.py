"""Beam search: the engine's beams and scores against transformers' `generate(num_beams=...)` (same length penalty and
early stopping), the output layout, limits, the KV cache row gather, and greedy at one beam."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.runtime import ModelRunner
from pipeline.runtime.beam_search import BeamSearch
from pipeline.runtime.kv_cache import KVCache
from tests.runtime.engines import build_engine

PROMPTS = [[5, 17, 3, 9, 22, 41, 7], [11, 2], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 12]]
BEAMS, NEW = 4, 8
# End ids that end some beams of these prompts early on the tiny models (asserted below, so the end-token paths run).
END_IDS = {"llama_gqa_untied": 4, "mixtral_4e_top2": 14}


@pytest.fixture(scope="module")
def engines(tiny_models, tmp_path_factory):
    return {m: build_engine(tiny_models[m], tmp_path_factory.mktemp(m), max_beam_width=BEAMS) for m in END_IDS}


def hf_beams(model, prompt, end_id, length_penalty, early_stopping, n=NEW, beams=BEAMS):
    ids = torch.tensor([prompt])
    hf_stop = {1: True, 0: False}.get(early_stopping, early_stopping)
    with torch.no_grad():
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, num_beams=beams,
                           num_return_sequences=beams, do_sample=False, length_penalty=length_penalty,
                           early_stopping=hf_stop, eos_token_id=end_id, pad_token_id=0, return_dict_in_generate=True,
                           output_scores=True)
    out = []
    for j in range(beams):
        tokens = g.sequences[j, len(prompt):].tolist()
        ended = end_id in tokens
        out.append((tokens[: tokens.index(end_id)] if ended else tokens, ended, g.sequences_scores[j].item()))
    return out


def engine_beams(out, i, prompt, length_penalty):
    beams = []
    for j in range(out["output_ids"].shape[1]):
        length = out["sequence_lengths"][i, j].item()
        tokens = out["output_ids"][i, j, len(prompt): length].tolist()
        ended = len(tokens) < NEW
        score = out["cum_log_probs"][i, j].item() / (len(tokens) + ended) ** length_penalty
        beams.append((tokens, ended, score))
    return beams


@pytest.mark.parametrize("model,length_penalty,early_stopping", [
    ("llama_gqa_untied", 1.0, 1), ("llama_gqa_untied", 0.5, 0), ("llama_gqa_untied", 2.0, "never"),
    ("mixtral_4e_top2", 1.0, 0),
])
def test_beams_and_scores_equal_transformers(tiny_models, engines, model, length_penalty, early_stopping):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_models[model], dtype=torch.float32).eval()
    runner = ModelRunner.from_dir(engines[model])
    end_id = END_IDS[model]
    out = runner.generate([torch.tensor(p) for p in PROMPTS], max_new_tokens=NEW, end_id=end_id, pad_id=0,
                          num_beams=BEAMS, length_penalty=length_penalty, early_stopping=early_stopping,
                          return_dict=True, output_cum_log_probs=True)
    ended = 0
    for i, p in enumerate(PROMPTS):
        got, want = engine_beams(out, i, p, length_penalty), hf_beams(ref, p, end_id, length_penalty, early_stopping)
        for j, ((g_tokens, g_ended, g_score), (w_tokens, w_ended, w_score)) in enumerate(zip(got, want)):
            assert (g_tokens, g_ended) == (w_tokens, w_ended), (model, i, j)
            assert g_score == pytest.approx(w_score, abs=1e-4), (model, i, j)
            ended += g_ended
    if length_penalty <= 1.0:  # (a strong length penalty favours the long beams)
        assert ended, "no beam ended with the end id: the test no longer covers completed hypotheses"


def test_output_layout_and_log_probs(engines):
    runner = ModelRunner.from_dir(engines["llama_gqa_untied"])
    end_id = END_IDS["llama_gqa_untied"]
    out = runner.generate([torch.tensor(p) for p in PROMPTS], max_new_tokens=NEW, end_id=end_id, pad_id=0,
                          num_beams=BEAMS, return_dict=True, output_cum_log_probs=True, output_log_probs=True)
    b, width = len(PROMPTS), max(map(len, PROMPTS)) + NEW
    assert out["output_ids"].shape == (b, BEAMS, width)
    assert out["sequence_lengths"].shape == out["cum_log_probs"].shape == (b, BEAMS)
    assert out["log_probs"].shape == (b, BEAMS, NEW)
    assert out["context_logits"].shape[0] == b
    for i, p in enumerate(PROMPTS):
        assert (out["output_ids"][i, :, : len(p)] == torch.tensor(p)).all()  # every beam starts with its prompt
        generated = out["sequence_lengths"][i] - len(p)
        scores = out["cum_log_probs"][i] / (generated + (generated < NEW).long()).float()
        assert (scores[:-1] >= scores[1:]).all()  # best first (length penalty 1)
        for j in range(BEAMS):
            n = generated[j].item()
            assert (out["output_ids"][i, j, len(p) + n:] == end_id).all()
            assert (out["log_probs"][i, j, n:] == 0).all() and (out["log_probs"][i, j, :n] < 0).all()
            if n == NEW:  # no end token: its cumulative log probability is the sum of the tokens'
                assert out["cum_log_probs"][i, j].item() == pytest.approx(out["log_probs"][i, j].sum().item(), abs=1e-4)
            else:  # the end token's log probability is in the sum, not in the reported tokens
                assert out["cum_log_probs"][i, j] < out["log_probs"][i, j].sum()


def test_streaming_ends_with_the_final_beams(engines):
    runner = ModelRunner.from_dir(engines["llama_gqa_untied"])
    kw = dict(max_new_tokens=NEW, end_id=END_IDS["llama_gqa_untied"], pad_id=0, num_beams=BEAMS, return_dict=True)
    steps = list(runner.generate([torch.tensor(p) for p in PROMPTS], streaming=True, **kw))
    final = runner.generate([torch.tensor(p) for p in PROMPTS], **kw)
    assert len(steps) >= 2 and steps[0]["output_ids"].shape[1] == BEAMS
    assert torch.equal(steps[-1]["output_ids"], final["output_ids"])
    assert torch.equal(steps[-1]["sequence_lengths"], final["sequence_lengths"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_beams=5), r"num_beams=5 must be in \[1, max_beam_width=4\]"),
    (dict(num_beams=2, stop_words_list=[[3]]), "stop_words_list with num_beams > 1"),
    (dict(num_beams=2, output_generation_logits=True), "output_generation_logits with num_beams > 1"),
    (dict(num_beams=2, temperature=0.7), "beam sampling"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping='sometimes'"),
])
def test_beam_requests_beyond_limits_are_clear_errors(engines, kwargs, message):
    runner = ModelRunner.from_dir(engines["llama_gqa_untied"])
    with pytest.raises(PipelineError, match=message):
        runner.generate([torch.tensor(PROMPTS[0])], **{**dict(max_new_tokens=4, end_id=-1, pad_id=0), **kwargs})


def test_one_beam_is_greedy():
    """The beam search rules with one beam and early stopping pick the greedy path (and stop at its end token)."""
    g = torch.Generator().manual_seed(0)
    vocab, n = 50, 12
    table = torch.randn(vocab, vocab, generator=g) * 3  # next-token logits as a function of the last token
    for end_id in (-1, int(table[7].argmax())):  # never, or right after the first step
        greedy, last = [], 7
        for _ in range(n):
            last = int(table[last].argmax())
            if last == end_id:
                break
            greedy.append(last)
        search, last_tokens = BeamSearch(1, 1, vocab, n, end_id, 1.0, 1), torch.tensor([7])
        for _ in range(n):
            _, tokens = search.step(table[last_tokens])
            last_tokens = tokens.flatten()
            if bool(search.done.all()):
                break
        result = search.result()
        assert result.tokens[0, 0, : result.lengths[0, 0]].tolist() == greedy


@pytest.mark.parametrize("quant", [None, "int8", "fp8"])
def test_cache_reorder_copies_only_the_gathered_rows_and_positions(quant):
    cache = KVCache(6, 2, 10, 4, torch.float32, quant=quant)
    values = torch.arange(cache.k.numel(), dtype=torch.float32).remainder(200).sub(100).view_as(cache.k)
    cache.k.copy_(values.to(cache.k.dtype))
    cache.v.copy_(values.flip(0).to(cache.v.dtype))

    def raw(t):  # compared as stored bytes: float8 tensors have no equality kernel on the CPU
        return t.view(torch.uint8) if t.element_size() == 1 else t

    before_k, before_v = raw(cache.k).clone(), raw(cache.v).clone()
    cache.reorder_rows(torch.tensor([0, 0, 3]), torch.tensor([1, 2, 5]), 4, 7)
    k, v = raw(cache.k), raw(cache.v)
    for dst, src in ((1, 0), (2, 0), (5, 3)):
        assert torch.equal(k[dst, :, 4:7], before_k[src, :, 4:7]) and torch.equal(v[dst, :, 4:7], before_v[src, :, 4:7])
        assert torch.equal(k[dst, :, :4], before_k[dst, :, :4]) and torch.equal(k[dst, :, 7:], before_k[dst, :, 7:])
    assert torch.equal(k[[0, 3, 4]], before_k[[0, 3, 4]]) and torch.equal(v[[0, 3, 4]], before_v[[0, 3, 4]])


@pytest.mark.slow
def test_default_model_four_beams_equal_transformers(smollm2_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = build_engine(smollm2_gguf, tmp_path, source="gguf", max_input_len=64, max_seq_len=128, max_beam_width=4)
    runner = ModelRunner.from_dir(engine)
    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    prompts = [tok.encode(t) for t in ["The capital of France is", "Once upon a time, in a small village,"]]
    n = 16
    out = runner.generate([torch.tensor(p) for p in prompts], max_new_tokens=n, end_id=tok.eos_token_id,
                          pad_id=tok.pad_token_id, num_beams=4, return_dict=True, output_cum_log_probs=True)
    for i, p in enumerate(prompts):
        want = hf_beams(ref, p, tok.eos_token_id, 1.0, 1, n=n, beams=4)
        for j, (w_tokens, w_ended, w_score) in enumerate(want):
            length = out["sequence_lengths"][i, j].item()
            tokens = out["output_ids"][i, j, len(p): length].tolist()
            assert tokens == w_tokens, (i, j)
            score = out["cum_log_probs"][i, j].item() / (len(tokens) + w_ended)
            assert score == pytest.approx(w_score, abs=1e-3), (i, j)


def test_beams_on_a_ring_cache_equal_transformers(tiny_models, tmp_path):
    """Sliding-window layers keep a ring of window + max_input_len slots; generating past it wraps the ring, and
    the beams' reordered caches must still hold each beam's own recent keys (gemma2: window 4, ring 4 + 12)."""
    from transformers import AutoModelForCausalLM

    engine = build_engine(tiny_models["gemma2_softcap"], tmp_path, max_beam_width=BEAMS, max_input_len=12)
    prompts, new = PROMPTS[:2], 24  # 12 + 24 positions: the ring of 16 slots wraps twice
    out = ModelRunner.from_dir(engine).generate([torch.tensor(p) for p in prompts], max_new_tokens=new, end_id=95,
                                                 pad_id=0, num_beams=BEAMS, return_dict=True,
                                                 output_cum_log_probs=True)
    ref = AutoModelForCausalLM.from_pretrained(tiny_models["gemma2_softcap"], dtype=torch.float32).eval()
    for i, p in enumerate(prompts):
        want = hf_beams(ref, p, 95, 1.0, 1, n=new)
        for j, (w_tokens, _, w_score) in enumerate(want):
            length = out["sequence_lengths"][i, j].item()
            assert out["output_ids"][i, j, len(p): length].tolist() == w_tokens, (i, j)
            got = out["cum_log_probs"][i, j].item() / (len(w_tokens) + (len(w_tokens) < new))
            assert got == pytest.approx(w_score, abs=1e-4), (i, j)
