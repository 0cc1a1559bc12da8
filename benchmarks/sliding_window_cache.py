"""KV cache memory of sliding-window layers: ring cache (window + max_input_len slots) against a full cache of
max_seq_len positions, on a Mistral-shaped model with random weights generating far past its window.

Each case runs in a fresh child process in the same command and prints one JSON line:

    python benchmarks/sliding_window_cache.py [--window 256] [--max_seq_len 16384] [--new_tokens 3000]

`cache_allocated_mb`: the KV cache tensors' size (what a cache sized for the limits reserves); `cache_resident_mb`:
the growth of the process's resident memory from just before generation to its end (the cache is lazily resident, so this
is what the generation actually touched). `full` is the same engine with the ring disabled. Ratios: ring / full.
The tokens of both cases are compared (they must be identical).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time, torch
import pipeline.runtime.runner as runner_module
from pipeline.runtime import ModelRunner
engine, case, prompt_len, new_tokens, batch = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
if case == "full":  # the same engine without the ring: every layer's cache spans max_seq_len
    make = runner_module.EngineModel
    runner_module.EngineModel = lambda *a: make(*a[:5])
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
runner = ModelRunner.from_dir(engine)
caches = runner.model.caches
allocated = sum(c.k.nbytes + c.v.nbytes for c in caches)
prompts = [torch.randint(1, 1000, (prompt_len,), generator=torch.Generator().manual_seed(i)) for i in range(batch)]
before = rss_mb()
started = time.perf_counter()
out = runner.generate(prompts, max_new_tokens=new_tokens, end_id=-1, pad_id=0)
seconds = time.perf_counter() - started
after = rss_mb()
print(json.dumps({"case": case, "cache_slots": sorted({c.k.shape[2] for c in caches}),
                  "cache_allocated_mb": round(allocated / 2**20, 1), "cache_resident_mb": round(after - before, 1),
                  "generate_seconds": round(seconds, 2), "tokens": out[:, 0, prompt_len:].tolist()}))
"""


def build(out: Path, window: int, max_seq_len: int, max_input_len: int, batch: int) -> Path:
    import torch
    import transformers

    from tests.runtime.engines import build_engine

    config = transformers.MistralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                        num_attention_heads=8, num_key_value_heads=8, head_dim=64,
                                        max_position_embeddings=max_seq_len, sliding_window=window)
    torch.manual_seed(0)
    transformers.MistralForCausalLM(config).save_pretrained(out / "hf")
    return build_engine(out / "hf", out, max_batch_size=batch, max_input_len=max_input_len, max_seq_len=max_seq_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--max_seq_len", type=int, default=16384)
    parser.add_argument("--max_input_len", type=int, default=256)
    parser.add_argument("--prompt_len", type=int, default=200)
    parser.add_argument("--new_tokens", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        engine = build(Path(tmp), args.window, args.max_seq_len, args.max_input_len, args.batch)
        results = {}
        for case in ("ring", "full"):
            proc = subprocess.run([sys.executable, "-c", CHILD, str(engine), case, str(args.prompt_len),
                                   str(args.new_tokens), str(args.batch)], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"case {case} failed: {proc.stderr[-2000:]}")
            results[case] = json.loads(proc.stdout.strip().splitlines()[-1])
    same = results["ring"].pop("tokens") == results["full"].pop("tokens")
    for r in results.values():
        r.update(window=args.window, max_seq_len=args.max_seq_len, new_tokens=args.new_tokens, batch=args.batch)
        print(json.dumps(r), flush=True)
    ratio = {k: round(results["ring"][k] / max(results["full"][k], 1e-9), 3)
             for k in ("cache_allocated_mb", "cache_resident_mb", "generate_seconds")}
    print(json.dumps({"ring_vs_full": ratio, "identical_tokens": same}), flush=True)


if __name__ == "__main__":
    main()
