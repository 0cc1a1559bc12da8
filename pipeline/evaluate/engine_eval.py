"""The engine side of an evaluation, run on every rank of the engine (in-process for one rank, under mpirun for
several: `python -m pipeline.evaluate.engine_eval REQUEST.json RESULT.json`; rank 0 writes the result)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline import faults
from pipeline.errors import PipelineError
from pipeline.evaluate.ppl import nll_sum
from pipeline.evaluate.speed import measure_speed
from pipeline.evaluate.stats import kl_from_full, kl_from_topk


def run_engine_eval(runner, request: dict[str, Any]) -> dict[str, Any]:
    """Generate for every prompt in batches (with beam search, the best beam: beam 0, as summarize.py scores);
    time to first token per batch; NLL over perplexity windows; then the decode speed probe at batch 1 and at the
    engine's max batch (pipeline.evaluate.speed)."""
    prompts, bs = request["prompts"], request["batch_size"]
    outputs, ttfts, generated, seconds = [], [], 0, 0.0
    show = request.get("progress", False) and runner.dist.rank == 0
    bar = tqdm(total=len(prompts), desc="engine generate", unit="sample", disable=not show or not prompts)
    for start in range(0, len(prompts), bs):
        batch = [torch.tensor(p) for p in prompts[start: start + bs]]
        t0 = time.perf_counter()
        first = None
        result = None
        for result in runner.generate(batch, max_new_tokens=request["max_new_tokens"], end_id=request["end_id"],
                                      pad_id=request["pad_id"], temperature=request["temperature"],
                                      top_k=request["top_k"], top_p=request["top_p"], num_beams=request["num_beams"],
                                      random_seed=request["random_seed"], return_dict=True, streaming=True,
                                      length_penalty=request.get("length_penalty", 1.0),
                                      early_stopping=request.get("early_stopping", 1)):
            if first is None:
                first = time.perf_counter() - t0
        seconds += time.perf_counter() - t0
        ttfts.append(first)
        lengths = result["sequence_lengths"][:, 0].tolist()
        for i, p in enumerate(batch):
            ids = result["output_ids"][i, 0, len(p): lengths[i]].tolist()
            outputs.append(ids)
            generated += len(ids)
        bar.update(len(batch))
        faults.point("evaluate:batch")
    bar.close()
    nll, tokens, kl, top1 = 0.0, 0, [], []
    with _open_reference(request.get("kl_reference")) as reference:
        for window in tqdm(request.get("ppl_windows", []), desc="engine perplexity", unit="window", disable=not show):
            if not runner.limits["gather_context_logits"]:
                raise PipelineError("perplexity needs an engine built with build.gather_context_logits=true")
            logits = runner.generate([torch.tensor(window)], max_new_tokens=1, end_id=-1, pad_id=0,
                                     return_dict=True)["context_logits"][0, : len(window)]
            n, t = nll_sum(logits, window)
            if reference is not None:  # the reference's rows for this window's t predicted positions
                k, agree = _window_kl(reference, tokens, tokens + t, logits[:t])
                kl += k.tolist()
                top1 += agree.tolist()
            nll, tokens = nll + n, tokens + t
    result = {"outputs": outputs, "seconds": seconds, "generated_tokens": generated, "ttft_seconds": ttfts,
              "ppl_nll": nll, "ppl_tokens": tokens, "load_seconds": runner.load_seconds}
    if reference is not None:
        result["kl"], result["top1"], result["kl_form"] = kl, top1, reference[0]
    speed = measure_speed(runner, request, request.get("speed_steps", 0), request.get("speed_prompt_len", 0))
    if speed is not None:
        result["speed"] = speed
    return result


@contextlib.contextmanager
def _open_reference(spec: dict[str, str] | None):
    """The reference's stored distributions (pipeline.stages.reference), opened lazily: only one window's rows are
    read at a time (the full form is 2 bytes x vocabulary per position); the file is closed after the windows."""
    if not spec:
        yield None
        return
    from safetensors import safe_open

    with safe_open(spec["path"], framework="pt") as f:
        yield spec["form"], f


def _window_kl(reference, start: int, end: int, logits: torch.Tensor):
    form, f = reference
    rows = {key: f.get_slice(key)[start:end] for key in f.keys()}
    if form == "full":
        return kl_from_full(rows["q"], rows["top"], rows["top1"], logits)
    return kl_from_topk(rows["logprobs"], rows["ids"], logits)


def main(argv: list[str]) -> int:
    from pipeline.runtime import ModelRunner
    from pipeline.runtime.parallel import report_rank_error

    request_path, result_path = Path(argv[0]), Path(argv[1])
    request = json.loads(request_path.read_text())
    try:
        runner = ModelRunner.from_dir(request["engine_dir"])
        result = run_engine_eval(runner, request)
    except PipelineError as e:
        return report_rank_error(e)
    if runner.dist.rank == 0:
        result_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
