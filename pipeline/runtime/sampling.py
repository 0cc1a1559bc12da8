"""Next-token selection: greedy, temperature, top-k, top-p; seeded through an explicit generator."""

from __future__ import annotations

import torch


def is_greedy(temperature: float, top_k: int, top_p: float) -> bool:
    """TensorRT-LLM's convention: top_k=1 is greedy, and so is top_k=0 with top_p=0 (no sampling set up at all)."""
    return top_k == 1 or (top_k == 0 and top_p == 0.0) or temperature == 0.0


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The first index of each row's maximum (a NaN counts as the maximum), as torch's argmax gives it. On CPU float32
    through numpy, whose argmax is vectorized: over the default model's 49152 logits 4 us against torch's 32 at one
    row, 20 against 137 at eight (2-core AMD EPYC), a token's bookkeeping the decode loop pays every step."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.from_numpy(logits.numpy().argmax(axis=-1).astype("int64", copy=False))
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits: [B, V] float32 -> token ids [B]."""
    if is_greedy(temperature, top_k, top_p):
        return greedy(logits)
    logits = logits / temperature
    if top_k > 1:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
