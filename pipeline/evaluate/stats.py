"""Statistics for comparing an engine with a baseline: a paired bootstrap of per-sample scores with a verdict, and
token-level KL divergence of an engine's next-token distributions against the reference's (llama.cpp's
`--kl-divergence`: mean KLD, 99th-percentile KLD, top-1 agreement, perplexity ratio).

The reference's distributions are stored as their top-K log-probabilities plus the remaining mass (a full float16
vocabulary would be ~100 KB per token); KL is computed over those K tokens and one "rest" bucket. Merging tokens
into a bucket can only lower KL (log-sum inequality), so the figure is a lower bound that is exact once the top K
hold all the mass; with K=64 the rest holds well under 1e-3 of the mass for a 135M model on ordinary text.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy and torch are imported by the functions that compute: judging a verdict needs neither
    import torch

# z for a two-sided 95% interval, and for 80% power: the classic sample-size formula n = ((z_a + z_b) sd / d)^2.
Z_95, Z_POWER_80 = 1.959964, 0.841621
N_BOOTSTRAP = 2000
TOPK = 64


def paired_bootstrap(scores: list[float], baseline: list[float], n_boot: int = N_BOOTSTRAP,
                     seed: int = 0) -> dict[str, float]:
    """Mean of the paired differences scores - baseline and its percentile bootstrap 95% interval: resample the
    samples (with replacement, the same indices for both sides), take the mean difference of each resample."""
    import numpy as np

    a, b = np.asarray(scores, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"a paired comparison needs as many scores as baseline scores, at least one ({a.size} vs {b.size})")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_boot, diff.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": round(float(diff.mean()), 6), "ci_low": round(float(lo), 6), "ci_high": round(float(hi), 6),
            "sd": round(float(diff.std(ddof=1)) if diff.size > 1 else 0.0, 6), "n": int(diff.size)}


def samples_needed(sd: float, delta: float) -> int:
    """About how many samples a paired test needs to detect a mean difference of `delta` (two-sided 5%, 80% power)."""
    return max(2, math.ceil(((Z_95 + Z_POWER_80) * sd / delta) ** 2))


def verdict(diff: dict[str, float], delta: float) -> str:
    """`same` when the 95% interval lies within +-delta, `worse` when it lies below zero and reaches past -delta,
    `better` when it lies above zero and reaches past +delta; otherwise `inconclusive` with the sample count that
    would settle it."""
    lo, hi = diff["ci_low"], diff["ci_high"]
    if -delta <= lo and hi <= delta:
        return "same"
    if hi < 0 and lo < -delta:
        return "worse"
    if lo > 0 and hi > delta:
        return "better"
    return f"inconclusive (n too small: need about {samples_needed(diff['sd'], delta)} samples to detect {delta:g} points)"


def topk_reference(logits: torch.Tensor, k: int = TOPK) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored form of reference distributions: top-k log-probs [T, k] (float32) and their token ids [T, k]."""
    import torch

    logp = torch.log_softmax(logits.double(), dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return values.float(), ids.to(torch.int32)


def kl_from_topk(ref_logp: torch.Tensor, ref_ids: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(reference || engine) over the reference's top-k tokens plus one bucket for the rest, and whether
    the engine's top-1 token equals the reference's. ref_logp/ref_ids [T, k], logits [T, V] of the engine."""
    import torch

    q_logp = torch.log_softmax(logits.double(), dim=-1)
    p_top = ref_logp.double().exp()
    q_top_logp = q_logp.gather(-1, ref_ids.long())
    kl = (p_top * (ref_logp.double() - q_top_logp)).sum(-1)
    p_rest = (1.0 - p_top.sum(-1)).clamp_min(0.0)
    q_rest = (1.0 - q_top_logp.exp().sum(-1)).clamp_min(1e-300)
    # Below 1e-6 the rest is float32 rounding of the stored log-probs, not probability mass.
    kl = kl + torch.where(p_rest > 1e-6, p_rest * (p_rest.clamp_min(1e-300).log() - q_rest.log()), torch.zeros_like(p_rest))
    top1 = q_logp.argmax(-1) == ref_ids[:, 0].long()
    return kl.clamp_min(0.0), top1


def kld_summary(kl: list[float], top1: list[bool], engine_ppl: float | None, ref_ppl: float | None) -> dict[str, Any]:
    """llama.cpp's headline KL figures."""
    import numpy as np

    values = np.asarray(kl, dtype=np.float64)
    out: dict[str, Any] = {"kld_mean": round(float(values.mean()), 6),
                           "kld_p99": round(float(np.percentile(values, 99)), 6),
                           "top1_agreement": round(float(np.mean(top1)), 6), "kld_tokens": int(values.size)}
    if engine_ppl and ref_ppl:
        out["ppl_ratio"] = round(engine_ppl / ref_ppl, 6)
    return out
