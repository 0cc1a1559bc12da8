"""The default model's CPU engines with two builds of the compiled kernels, in one process, in paired bursts.

    python benchmarks/engine_kernels.py --before REV [--isa avx2] [--formats fp32 w4a16 ...] [--rounds 30] [--steps 5]
    python benchmarks/engine_kernels.py --isas [--formats ...]
    python benchmarks/engine_kernels.py --kernel_before onednn|torch [--formats fp16 bf16]

`roofline.py --before` runs each tree in its own process, a round (a minute or more) at a time; on a VM whose speed
drifts over minutes its batch-1 after/before ratios moved 0.81-1.43 between runs with the kernels unchanged, and
alternating whole 32-token decodes in one process still moved 0.89-1.19. Here each engine (built by the pipeline
through the artifact cache, as roofline.py builds it) is loaded twice in one process, once with this tree's compiled
kernels and once with REV's (its `quant_gemm.cpp` and headers built under their own module name, as
`linear_kernels.py --before` builds them; REV's module must have this tree's interface), and the two run a decode
token's model work (`step` at one position over a short KV cache, then `logits`) in turn (each first in half the
pairs), `--steps` tokens a burst, `--rounds` pairs of bursts at batch 1 and at batch 8 (roofline.py's
`paired_bursts`). Each pair gives an after/before ratio, its two bursts milliseconds apart; the median of those
ratios is the figure (the best burst of each side is shown beside it). The Python side, the weights and the inputs
are the same; only the compiled kernels differ. Against its own revision it read 0.96-1.02. With `--isa avx2` both
sides run their weight kernels' AVX2 instance (this project's usual machine class has no AVX-512; REV must have the
instances). `--isas` compares this tree's AVX2 instance of the weight kernels ("before") with its AVX-512 one
("after") the same way. `--kernel_before NAME` compares the engine loaded with the linear kernel NAME ("before")
and with `auto` ("after"), both with this tree's compiled kernels: e.g. 16-bit engines, whose `auto` became the
compiled GEMV, against the `onednn` or `torch` kernel they ran before.

Also prints each side's batch-1 roofline fraction of that model work (roofline.py's definition with the best burst's
tokens/s: the bytes a step reads as stored x tokens/s / the read bandwidth measured here; the runner's sampling and
bookkeeping, which roofline.py's figure includes, are left out). Figures are machine-dependent; the ratios compare
across machines.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from linear_kernels import Instance, kernels_of_revision  # noqa: E402
from roofline import (FORMATS, KV_LEN, engine_for, kv_bytes_per_step, paired_bursts, read_bandwidth,  # noqa: E402
                      stored_weight_bytes)


def runner_with(engine: Path, module, kernel: str = "auto"):
    """A runner of `engine` whose compiled calls are `module`'s: every part of the engine takes the module it calls
    from `native.load()` while it loads (the native kernel, each quantized linear, each fused layer)."""
    from pipeline.runtime import ModelRunner, native

    saved = native.load
    native.load = lambda: module
    try:
        return ModelRunner.from_dir(engine, kernel=kernel)
    finally:
        native.load = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--formats", nargs="*", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--before", help="a git revision of this repository whose compiled kernels to compare")
    p.add_argument("--isa", choices=["avx2", "avx512"],
                   help="with --before or --kernel_before: both sides on this weight-kernel instance")
    p.add_argument("--isas", action="store_true", help="compare this tree's AVX2 and AVX-512 instances")
    p.add_argument("--kernel_before", choices=["torch", "onednn"],
                   help="compare the linear kernel NAME (before) with auto (after), both with this tree's kernels")
    p.add_argument("--rounds", type=int, default=30, help="pairs of bursts per format and batch")
    p.add_argument("--steps", type=int, default=5, help="tokens per burst")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=str(REPO / "outputs" / "cache"))
    args = p.parse_args()
    if sum((bool(args.before), args.isas, bool(args.kernel_before))) != 1:
        sys.exit("engine_kernels: give one of --before REV, --isas, --kernel_before NAME")
    import torch

    from pipeline.runtime import native

    torch.set_num_threads(args.threads)
    after = native.load()
    if after is None:
        sys.exit(f"engine_kernels: the compiled kernels are unavailable here: {native.unavailable_reason()}")
    if args.isa and args.isa not in after.supported_isas():
        sys.exit(f"engine_kernels: this CPU has no {args.isa.upper()} instance of the weight kernels")
    with tempfile.TemporaryDirectory(prefix="engine-kernels-") as tmp:
        if args.isas:
            if "avx512" not in after.supported_isas():
                sys.exit("engine_kernels: --isas needs a CPU with AVX-512")
            sides = {"before": Instance(after, "avx2"), "after": Instance(after, "avx512")}
        elif args.kernel_before:
            sides = {"before": Instance(after, args.isa), "after": Instance(after, args.isa)}
        else:
            sides = {"before": Instance(kernels_of_revision(args.before, Path(tmp)), args.isa),
                     "after": Instance(after, args.isa)}
        kernel = {"before": args.kernel_before or "auto", "after": "auto"}
        engines = {f: engine_for(f, Path(args.cache).resolve()) for f in args.formats}  # built before any timing
        bandwidth = read_bandwidth()
        rows = []
        for fmt, engine in engines.items():
            models = {name: runner_with(engine, side.module, kernel[name]).model for name, side in sides.items()}
            activate = {name: side.activate for name, side in sides.items()}
            figures = {batch: paired_bursts(models, batch, args.rounds, args.steps, activate) for batch in (1, 8)}
            stored = stored_weight_bytes(engine) + kv_bytes_per_step(models["after"], KV_LEN)
            rows.append((fmt, stored, figures))
            del models
        bandwidth = max(bandwidth, read_bandwidth())
    label = ("AVX2 -> AVX-512" if args.isas else f"kernel {args.kernel_before} -> auto" if args.kernel_before
             else f"{args.before} -> working tree") + (f" ({args.isa})" if args.isa else "")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; {label}; {args.rounds} pairs of {args.steps}-token "
          "bursts")
    print("| format | b1 ms/token before -> after | b1 after/before | roofline b1 before -> after | b8 ms/step before -> "
          "after | b8 after/before |\n|---|---|---|---|---|---|")
    for fmt, stored, figures in rows:
        (b1, a1, r1), (b8, a8, r8) = figures[1], figures[8]
        print(f"| {fmt} | {b1 * 1e3:.2f} -> {a1 * 1e3:.2f} | {r1:.3f} | {stored / b1 / bandwidth:.2f} -> "
              f"{stored / a1 / bandwidth:.2f} | {b8 * 1e3:.2f} -> {a8 * 1e3:.2f} | {r8:.3f} |")


if __name__ == "__main__":
    main()
