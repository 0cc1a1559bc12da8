"""Statistics for comparing an engine with a baseline: a paired bootstrap of per-sample scores with a verdict, and
token-level KL divergence of an engine's next-token distributions against the reference's (llama.cpp's
`--kl-divergence`: mean KLD, 99th-percentile KLD, top-1 agreement, perplexity ratio).

The reference's distributions are stored in one of two forms (`evaluate.kl_reference`):
- `full` (default): the whole vocabulary's log-probs per position, as llama.cpp stores them: uint16 steps over the
  LOGPROB_RANGE nats below the position's top log-prob (float32), its top-1 token id beside. A log-prob is off by at
  most half a step (LOGPROB_RANGE / 65535 / 2 = 2.4e-4 nats); tokens more than LOGPROB_RANGE below the top are
  stored at the floor, which overstates each by less than e^-32 of the top's probability (< 1e-9 of mass in all for
  a 50k vocabulary). The dequantized log-probs are renormalized, and KL is summed over every token: exact up to
  that rounding, which moves a position's KL by at most about one step (4.9e-4 nats) times E_p|log p/q| (a few 1e-4 of
  the KL itself on a 50k vocabulary; tests/evaluate/test_stats.py). 2 bytes x vocabulary per position: 96 KB for
  SmolLM2's 49152 tokens.
- `topk`: the top-TOPK log-probs plus one bucket for the remaining mass (512 bytes per position). Merging tokens
  into a bucket can only lower KL (log-sum inequality), so the figure is a lower bound, exact once the top K hold
  all the mass; for vocabularies where the full form is too large.
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
LOGPROB_RANGE = 32.0  # nats below a position's top log-prob that the full form resolves
LOGPROB_STEPS = 65535


def stored_bytes_per_position(form: str, vocab_size: int) -> int:
    """Bytes one window position takes in the reference's stored form: a uint16 per vocabulary entry (`full`), or
    TOPK float32 log-probs and TOPK int32 token ids (`topk`)."""
    return 2 * vocab_size if form == "full" else TOPK * 8


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


def quantize_logprobs(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The full stored form of reference distributions from logits [T, V]: `q` [T, V] int16 (uint16 steps below the
    top, offset by -32768 so the file needs no unsigned type), `top` [T] float32, `top1` [T] int32."""
    import torch

    logp = torch.log_softmax(logits.double(), dim=-1)
    top, top1 = logp.max(dim=-1)
    steps = torch.round((logp - (top[:, None] - LOGPROB_RANGE)) * (LOGPROB_STEPS / LOGPROB_RANGE))
    q = (steps.clamp(0, LOGPROB_STEPS) - 32768).to(torch.int16)
    return {"q": q, "top": top.float(), "top1": top1.to(torch.int32)}


def dequantize_logprobs(q: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Log-probs [T, V] (float64, renormalized) from the full stored form."""
    import torch

    steps = q.to(torch.float64) + 32768.0
    logp = top.double()[:, None] - LOGPROB_RANGE + steps * (LOGPROB_RANGE / LOGPROB_STEPS)
    return torch.log_softmax(logp, dim=-1)


def kl_from_full(q: torch.Tensor, top: torch.Tensor, top1: torch.Tensor,
                 logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(reference || engine) summed over the whole vocabulary, and whether the engine's top-1 token is
    the reference's. q [T, V], top/top1 [T] (quantize_logprobs), logits [T, V] of the engine."""
    import torch

    p_logp = dequantize_logprobs(q, top)
    q_logp = torch.log_softmax(logits.double(), dim=-1)
    kl = (p_logp.exp() * (p_logp - q_logp)).sum(-1)
    return kl.clamp_min(0.0), q_logp.argmax(-1) == top1.long()


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
