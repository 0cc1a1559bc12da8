"""Decode speed of an engine at batch 1 and at its max batch, and time to first token: a short probe after the
evaluation, on the same runner (every rank takes part; rank 0's clock is reported).

The probe feeds `batch` copies of one prompt of fixed length (the first evaluation prompt or perplexity window, cut
to `prompt_len` tokens, so every point of a sweep is timed on the same input) and generates `steps + 1` tokens with no
end id, so no row stops early. Time to first token is prefill plus the first sampled token; decode tokens/s is
batch x steps over the time of the `steps` decode steps that follow. A 2-token warm-up at each batch first keeps
one-time allocations out of the figures."""

from __future__ import annotations

import time
from typing import Any

import torch

WARMUP_TOKENS = 2


def probe_prompt(request: dict[str, Any], prompt_len: int, room: int) -> list[int] | None:
    """The probe's prompt: the first prompt or window, its last `prompt_len` tokens (at most `room`)."""
    source = next(iter(request.get("prompts") or request.get("ppl_windows") or []), None)
    if not source or room < 1:
        return None
    return list(source[-min(prompt_len, room):])


def time_decode(runner, prompt: list[int], batch: int, steps: int) -> dict[str, float]:
    """Time to first token and decode tokens/s for `batch` copies of `prompt`."""
    ids = [torch.tensor(prompt)] * batch
    runner.generate(ids, max_new_tokens=WARMUP_TOKENS, end_id=-1, pad_id=0)
    stamps = []
    t0 = time.perf_counter()
    for _ in runner.generate(ids, max_new_tokens=steps + 1, end_id=-1, pad_id=0, streaming=True):
        stamps.append(time.perf_counter())
    decode = stamps[-1] - stamps[0]
    return {"ttft_seconds": round(stamps[0] - t0, 5),
            "decode_tokens_per_second": round(batch * steps / decode, 2) if decode > 0 else None}


def measure_speed(runner, request: dict[str, Any], steps: int, prompt_len: int) -> dict[str, Any] | None:
    """Batch 1 and the engine's max batch (one entry when that is 1); None when disabled or there is no prompt."""
    limits = runner.limits
    room = min(limits["max_input_len"], limits["max_seq_len"] - steps - 1)
    prompt = probe_prompt(request, prompt_len, room) if steps > 0 else None
    if prompt is None:
        return None
    out: dict[str, Any] = {"prompt_tokens": len(prompt), "decode_steps": steps,
                           "max_batch_size": limits["max_batch_size"]}
    out["batch_1"] = time_decode(runner, prompt, 1, steps)
    if limits["max_batch_size"] > 1:
        out["batch_n"] = time_decode(runner, prompt, limits["max_batch_size"], steps)
    return out
