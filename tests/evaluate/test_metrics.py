"""ROUGE, prompts and perplexity helpers."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.evaluate.ppl import nll_sum, perplexity, windows
from pipeline.evaluate.prompts import encode_prompt, tldr_text
from pipeline.evaluate.rouge import rouge, rouge_per_sample


def test_rouge_identical_and_disjoint():
    assert rouge(["the cat sat"], ["the cat sat"])["rouge1"] == 100.0
    assert rouge(["dogs run"], ["the cat sat"])["rouge1"] == 0.0


def test_rouge_by_hand():
    # unigram overlap 2 of 3 predicted and 2 of 4 reference words: F = 2PR/(P+R) = 2*(2/3)*(1/2)/((2/3)+(1/2))
    got = rouge_per_sample(["the cat sat"], ["the cat was here"])[0]["rouge1"]
    assert got == pytest.approx(100 * 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))


def test_rouge_aggregation_is_deterministic():
    preds, refs = ["a b c", "d e f g", "h i"], ["a b x", "d y f g", "z i"]
    assert rouge(preds, refs) == rouge(preds, refs)


def test_tldr_prompt():
    assert tldr_text("  It is n't here.") == "It isn't here. TL;DR:"


class FakeTokenizer:
    chat_template = None

    def encode(self, text):
        return list(range(len(text.split())))


def test_left_truncation_keeps_the_end():
    ids = encode_prompt(FakeTokenizer(), "w " * 50, "tldr", None, 10)
    assert len(ids) == 10 and ids[-1] == 50  # the "TL;DR:" token (index 50) survives


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    ids = [1, 2, 3, 4]
    nll, n = nll_sum(torch.zeros(4, 10), ids)
    assert n == 3 and perplexity(nll, n) == pytest.approx(10.0)
    assert windows(list(range(10)), 4, 10) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert math.isfinite(perplexity(nll, n))
