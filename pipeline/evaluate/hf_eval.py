"""The transformers side of an evaluation: same prompts, same dtype, same generation settings. Greedy decoding runs
in left-padded, attention-masked batches of prompts sorted by length (summarize.py ran one at a time because
padded HF batches can differ from unpadded ones: see docs/SWEEPS.md for the measured agreement); sampling runs
one prompt at a time so its seeded draws do not depend on batch composition."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm import tqdm

from pipeline.evaluate.ppl import nll_sum
from pipeline.evaluate.stats import quantize_logprobs, topk_reference


def is_greedy(request: dict[str, Any]) -> bool:
    return request["top_k"] == 1 or (request["top_k"] == 0 and request["top_p"] == 0.0)


@torch.inference_mode()
def generate_batch(model, prompts: list[list[int]], request: dict[str, Any], sampling: dict[str, Any]) -> list[list[int]]:
    """Generate for prompts together: left-padded with the pad id, masked, positions from the mask (transformers
    derives them from the attention mask); every output cut at its first end id."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), request["pad_id"], dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=request["max_new_tokens"],
                         eos_token_id=request["end_id"], pad_token_id=request["pad_id"],
                         **{"num_beams": 1, **sampling})[:, width:].tolist()
    return [o[: o.index(request["end_id"])] if request["end_id"] in o else o for o in out]


@torch.inference_mode()
def run_hf_eval(model, request: dict[str, Any], batch_size: int = 1, progress: bool = False,
                kl_form: str | None = None) -> dict[str, Any]:
    """Outputs for every prompt (batched when greedy), NLL over the perplexity windows and, with kl_form, each
    window position's distribution in its stored form (`full`: every token's log-prob on a uint16 grid, `topk`:
    the top-k log-probs; pipeline.evaluate.stats), what KL divergence is measured against."""
    greedy = is_greedy(request)
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": request["temperature"],
                                                    "top_k": request["top_k"] or None, "top_p": request["top_p"] or None}
    beams = request.get("num_beams", 1)
    if beams > 1:  # transformers' beam search with the same settings, its best sequence; one prompt at a time
        early = {1: True, 0: False}.get(request.get("early_stopping", 1), "never")
        sampling = {"do_sample": False, "num_beams": beams, "length_penalty": request.get("length_penalty", 1.0),
                    "early_stopping": early}
    if request["random_seed"] is not None:
        torch.manual_seed(request["random_seed"])
    prompts = request["prompts"]
    size = max(1, batch_size) if greedy and beams == 1 else 1
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if size > 1 else list(range(len(prompts)))
    outputs: list[list[int]] = [[] for _ in prompts]
    seconds = 0.0
    with tqdm(total=len(prompts), desc="reference generate", unit="sample", disable=not progress or not prompts) as bar:
        for start in range(0, len(order), size):
            chunk = order[start: start + size]
            t0 = time.perf_counter()
            for i, out in zip(chunk, generate_batch(model, [prompts[i] for i in chunk], request, sampling)):
                outputs[i] = out
            seconds += time.perf_counter() - t0
            bar.update(len(chunk))
    windows = request.get("ppl_windows", [])
    nll, tokens, stored, filled = 0.0, 0, None, 0
    for window in tqdm(windows, desc="reference perplexity", unit="window", disable=not progress or not windows):
        logits = model(torch.tensor([window])).logits[0].float()
        n, t = nll_sum(logits, window)
        nll, tokens = nll + n, tokens + t
        if kl_form:
            part = store_distributions(logits[: len(window) - 1], kl_form)
            if stored is None:  # filled in place: a list of windows and their concatenation would be twice the size
                positions = sum(len(w) - 1 for w in windows)
                stored = {k: v.new_empty((positions, *v.shape[1:])) for k, v in part.items()}
            for k, v in part.items():
                stored[k][filled: filled + len(v)] = v
            filled += len(window) - 1
    result = {"outputs": outputs, "seconds": seconds, "generated_tokens": sum(len(o) for o in outputs),
              "ppl_nll": nll, "ppl_tokens": tokens, "batch_size": size}
    if stored is not None:
        result["kl_reference"] = stored
    return result


def store_distributions(logits: torch.Tensor, form: str) -> dict[str, torch.Tensor]:
    """Reference distributions [T, V] in their stored form: `full` or `topk` (pipeline.evaluate.stats)."""
    if form == "full":
        return quantize_logprobs(logits)
    logprobs, ids = topk_reference(logits)
    return {"logprobs": logprobs, "ids": ids}
