"""Paired bootstrap, verdicts, sample-size estimate and KL divergence against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.evaluate.stats import (LOGPROB_RANGE, LOGPROB_STEPS, dequantize_logprobs, kl_from_full, kl_from_topk,
                                     kld_summary, paired_bootstrap, quantize_logprobs, samples_needed, topk_reference,
                                     verdict)


def test_bootstrap_of_two_samples_matches_the_enumerated_distribution():
    # diffs [0, 2]: resampled means are 0 (1/4), 1 (1/2), 2 (1/4); the 2.5th and 97.5th percentiles are 0 and 2.
    d = paired_bootstrap([5.0, 7.0], [5.0, 5.0], n_boot=4000)
    assert d["mean"] == 1.0 and d["ci_low"] == 0.0 and d["ci_high"] == 2.0
    assert d["sd"] == pytest.approx(math.sqrt(2)) and d["n"] == 2


def test_constant_difference_has_a_degenerate_interval():
    d = paired_bootstrap([3.0, 4.5, 9.0], [1.0, 2.5, 7.0])
    assert (d["mean"], d["ci_low"], d["ci_high"], d["sd"]) == (2.0, 2.0, 2.0, 0.0)


def test_bootstrap_refuses_unpaired_input():
    with pytest.raises(ValueError, match="as many"):
        paired_bootstrap([1.0], [1.0, 2.0])


def test_samples_needed_by_the_power_formula():
    # ((1.959964 + 0.841621) * 2 / 1)^2 = 31.39 -> 32
    assert samples_needed(2.0, 1.0) == 32
    assert samples_needed(0.0, 1.0) == 2


@pytest.mark.parametrize("lo, hi, expected", [(-0.5, 0.5, "same"), (-3.0, -0.2, "worse"), (0.3, 2.5, "better"),
                                              (-3.0, 1.0, "inconclusive"), (-0.5, 1.5, "inconclusive")])
def test_verdicts(lo, hi, expected):
    assert verdict({"ci_low": lo, "ci_high": hi, "sd": 4.0, "mean": (lo + hi) / 2}, 1.0).startswith(expected)


def test_verdict_at_small_and_large_n():
    """The same noisy per-sample differences (mean -0.25, sd ~3) are inconclusive at n=8 and `same` at n=8x400."""
    diffs = [3.0, -3.5, 2.0, -2.5, 4.0, -4.0, 0.5, -1.5]
    small = paired_bootstrap(diffs, [0.0] * len(diffs))
    v = verdict(small, 1.0)
    assert v.startswith("inconclusive") and f"need about {samples_needed(small['sd'], 1.0)} samples" in v
    large = paired_bootstrap(diffs * 400, [0.0] * len(diffs) * 400)
    assert verdict(large, 1.0) == "same"
    worse = paired_bootstrap([d - 3 for d in diffs] * 400, [0.0] * len(diffs) * 400)
    assert verdict(worse, 1.0) == "worse"


def test_kl_of_two_token_distributions():
    # p = (3/4, 1/4), q = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812
    ref = torch.log(torch.tensor([[0.75, 0.25]]))
    eng = torch.log(torch.tensor([[0.5, 0.5]]))
    for k in (1, 2):  # one top token and the rest bucket is exact for two tokens
        logp, ids = topk_reference(ref, k)
        kl, top1 = kl_from_topk(logp, ids, eng)
        assert kl.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    assert top1.tolist() == [True]  # a tie goes to the lower token id, the reference's top-1


def test_kl_top1_agreement_and_the_rest_bucket_lower_bound():
    torch.manual_seed(0)
    ref, eng = torch.randn(5, 50), torch.randn(5, 50)
    exact = (torch.softmax(ref.double(), -1) * (torch.log_softmax(ref.double(), -1)
                                                  - torch.log_softmax(eng.double(), -1))).sum(-1)
    full, top1 = kl_from_topk(*topk_reference(ref, 50), eng)
    assert torch.allclose(full, exact, atol=1e-6)  # the stored log-probs are float32
    assert top1.tolist() == (ref.argmax(-1) == eng.argmax(-1)).tolist()
    partial, _ = kl_from_topk(*topk_reference(ref, 8), eng)
    assert bool((partial <= exact + 1e-9).all()) and bool((partial > 0).all())
    assert kl_from_topk(*topk_reference(ref, 8), ref)[0].abs().max() < 1e-6  # identical distributions: zero


@pytest.mark.parametrize("p, q, expected", [
    ((0.75, 0.25), (0.5, 0.5), 0.75 * math.log(1.5) + 0.25 * math.log(0.5)),  # 0.130812
    ((0.5, 0.3, 0.2), (0.2, 0.3, 0.5), 0.5 * math.log(2.5) + 0.2 * math.log(0.4)),  # 0.274887
    ((0.9, 0.05, 0.05), (0.9, 0.05, 0.05), 0.0),
])
def test_full_kl_against_hand_computed_values(p, q, expected):
    stored = quantize_logprobs(torch.log(torch.tensor([p])))
    kl, top1 = kl_from_full(stored["q"], stored["top"], stored["top1"], torch.log(torch.tensor([q])))
    # the uint16 grid moves each log-prob by at most half a step, one step after renormalization: to first order the
    # KL moves by at most one step times E_p|log p/q|
    bound = LOGPROB_RANGE / LOGPROB_STEPS * sum(a * abs(math.log(a / b)) for a, b in zip(p, q)) + 1e-7
    assert abs(kl.item() - expected) <= bound
    assert top1.tolist() == [max(range(len(p)), key=p.__getitem__) == max(range(len(q)), key=q.__getitem__)]


def test_full_form_is_exact_where_the_top_k_bound_is_not():
    """A 50k vocabulary with a flat tail (the top 64 hold a fraction of the mass): the full form matches the exact KL
    to 3e-4 relative, the top-k figure is about half of it."""
    torch.manual_seed(0)
    ref = torch.randn(6, 50000) * 3
    eng = ref + 0.3 * torch.randn(6, 50000)
    exact = (torch.softmax(ref.double(), -1) * (torch.log_softmax(ref.double(), -1)
                                                  - torch.log_softmax(eng.double(), -1))).sum(-1)
    stored = quantize_logprobs(ref)
    assert stored["q"].dtype == torch.int16 and stored["q"].shape == (6, 50000)
    assert stored["top1"].tolist() == ref.argmax(-1).tolist()
    full, _ = kl_from_full(stored["q"], stored["top"], stored["top1"], eng)
    assert torch.allclose(full, exact, rtol=3e-4, atol=0)
    bound, _ = kl_from_topk(*topk_reference(ref, 64), eng)
    assert bool((bound < 0.7 * exact).all())
    assert kl_from_full(stored["q"], stored["top"], stored["top1"], ref)[0].max() < 1e-7  # same distribution


def test_full_form_grid_and_floor():
    logp = torch.tensor([[-0.01, -5.0, -31.0, -100.0]])
    back = dequantize_logprobs(quantize_logprobs(logp)["q"], quantize_logprobs(logp)["top"])
    truth = torch.log_softmax(logp.double(), -1)
    step = LOGPROB_RANGE / LOGPROB_STEPS
    assert torch.allclose(back[0, :3], truth[0, :3], atol=step)  # within one grid step (half, plus renormalization)
    assert back[0, 3].item() == pytest.approx(truth[0, 0].item() - LOGPROB_RANGE, abs=step)  # the floor


def test_kld_summary():
    s = kld_summary([0.0] * 99 + [1.0], [True] * 90 + [False] * 10, 11.0, 10.0)
    assert s["kld_mean"] == 0.01 and s["top1_agreement"] == 0.9 and s["ppl_ratio"] == 1.1 and s["kld_tokens"] == 100
    assert s["kld_p99"] == pytest.approx(0.01)  # numpy's linear interpolation between the 99th (0) and 100th (1)
