"""The transformers side of an evaluation: same prompts, same dtype, same generation settings, one sample at a time
(summarize.py notes that padded HF batches break parity)."""

from __future__ import annotations

import time
from typing import Any

import torch

from pipeline.evaluate.ppl import nll_sum


@torch.inference_mode()
def run_hf_eval(model, request: dict[str, Any]) -> dict[str, Any]:
    greedy = request["top_k"] == 1 or (request["top_k"] == 0 and request["top_p"] == 0.0)
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": request["temperature"],
                                  "top_k": request["top_k"] or None, "top_p": request["top_p"] or None}
    beams = request.get("num_beams", 1)
    if beams > 1:  # transformers' beam search with the same settings; its best sequence
        early = {1: True, 0: False}.get(request.get("early_stopping", 1), "never")
        sampling = {"do_sample": False, "length_penalty": request.get("length_penalty", 1.0), "early_stopping": early}
    if request["random_seed"] is not None:
        torch.manual_seed(request["random_seed"])
    outputs, generated, seconds = [], 0, 0.0
    for prompt in request["prompts"]:
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=request["max_new_tokens"],
                             eos_token_id=request["end_id"], pad_token_id=request["pad_id"],
                             num_beams=beams, **sampling)[0, len(prompt):].tolist()
        seconds += time.perf_counter() - t0
        if request["end_id"] in out:
            out = out[: out.index(request["end_id"])]
        outputs.append(out)
        generated += len(out)
    nll, tokens = 0.0, 0
    for window in request.get("ppl_windows", []):
        logits = model(torch.tensor([window])).logits[0].float()
        n, t = nll_sum(logits, window)
        nll, tokens = nll + n, tokens + t
    return {"outputs": outputs, "seconds": seconds, "generated_tokens": generated, "ppl_nll": nll, "ppl_tokens": tokens}
