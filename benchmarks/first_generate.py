"""A freshly loaded CPU engine's first `generate`: its time and the memory it makes resident, against the second.

    python benchmarks/first_generate.py [--before REV | --tree PATH] [--formats fp32 ...] [--batches 1 8]
                                        [--new_tokens 32] [--rounds 2]

The engine comes from the pipeline (benchmarks/roofline.py's `engine_for`: the artifact cache, `--cache`) at the
default recipe's build limits (8 sequences of 2048 positions), so its KV caches are sized as a user's are. For each
tree, format and batch a fresh child process loads the engine, then calls `generate` twice (a 20-token prompt per
sequence, `--new_tokens` greedy tokens) and prints, per call, the seconds and the growth of the process's peak
resident memory (VmHWM) from just after the load. The first call pays for whatever the runtime makes resident or
prepares on first use (KV-cache pages, scratch buffers); the second shows the steady state.

`--before REV` (a git revision of this repository, exported with `git archive`) or `--tree PATH` runs the same
children with that tree's `pipeline` package on the same engine files, alternately with this tree for `--rounds`
rounds (best time of each; memory is the largest growth seen). Figures are machine-dependent; compare the ratios.
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
sys.path.insert(0, str(REPO / "benchmarks"))

CHILD = r"""
import json, sys, time, torch
from pipeline.runtime import ModelRunner
engine, batch, new_tokens, threads = sys.argv[1], *map(int, sys.argv[2:5])
torch.set_num_threads(threads)
def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
runner = ModelRunner.from_dir(engine)
base = peak_mb()
calls = []
for _ in range(2):
    t0 = time.perf_counter()
    runner.generate([torch.arange(100, 120)] * batch, max_new_tokens=new_tokens, end_id=-1, pad_id=0)
    calls.append({"seconds": time.perf_counter() - t0, "peak_growth_mb": peak_mb() - base})
print("CALLS " + json.dumps(calls))
"""


def run_child(tree: Path, engine: Path, batch: int, args) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(engine), str(batch), str(args.new_tokens),
                           str(args.threads)], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CALLS ")]
    if proc.returncode or not lines:
        sys.exit(f"first_generate: the child for {tree} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][6:])


def main() -> None:
    import roofline

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--formats", nargs="*", default=["fp32"], choices=sorted(roofline.FORMATS))
    p.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--before", help="a git revision of this repository to measure beside the working tree")
    p.add_argument("--tree", help="a source checkout to measure beside the working tree")
    p.add_argument("--cache", default=str(REPO / "outputs" / "cache"))
    args = p.parse_args()
    if max(args.batches) > 8:
        sys.exit("first_generate: the engine is built for at most 8 sequences")
    engines = {f: roofline.engine_for(f, Path(args.cache)) for f in args.formats}
    with tempfile.TemporaryDirectory(prefix="first_generate_") as tmp:
        trees = {"after": REPO}
        if args.before:
            trees["before"] = roofline.export_revision(args.before, Path(tmp))
        elif args.tree:
            trees["before"] = Path(args.tree).resolve()
        best: dict[tuple, list[dict]] = {}
        for r in range(args.rounds):
            for name in sorted(trees, reverse=bool(r % 2)):
                for fmt, engine in engines.items():
                    for batch in args.batches:
                        calls = run_child(trees[name], engine, batch, args)
                        key = (name, fmt, batch)
                        if key not in best:
                            best[key] = calls
                        else:
                            best[key] = [{"seconds": min(a["seconds"], b["seconds"]),
                                          "peak_growth_mb": max(a["peak_growth_mb"], b["peak_growth_mb"])}
                                         for a, b in zip(best[key], calls)]
    print(f"| tree | format | batch | first call s | first peak +MB | second call s | second peak +MB |")
    print("|---|---|---|---|---|---|---|")
    for (name, fmt, batch), (first, second) in sorted(best.items()):
        print(f"| {name} | {fmt} | {batch} | {first['seconds']:.2f} | {first['peak_growth_mb']:.0f} | "
              f"{second['seconds']:.2f} | {second['peak_growth_mb']:.0f} |")
    if "before" in trees:
        for fmt in args.formats:
            for batch in args.batches:
                a, b = best[("after", fmt, batch)][0], best[("before", fmt, batch)][0]
                print(f"{fmt} batch {batch}: first call after/before {a['seconds'] / b['seconds']:.3f}, "
                      f"peak growth {b['peak_growth_mb']:.0f} -> {a['peak_growth_mb']:.0f} MB")
    print(json.dumps({f"{n}|{f}|{b}": v for (n, f, b), v in best.items()}))


if __name__ == "__main__":
    main()
