"""The CPU engine's linear kernels alone, on one decode step's worth of weights of the default model's shapes.

    python benchmarks/linear_kernels.py [--threads 2] [--layers 30] [--steps 10] [--before REV [--rounds 3]]
                                        [--isas [--rounds 3]]

Per layer SmolLM2-135M multiplies by four weights, (960, 576) qkv, (576, 576) dense, (3072, 576) fc+gate and
(576, 1536) proj; `--layers` distinct random sets of them (30: the model's, 106 MB of float32 at one byte per
weight, so no run is served from the caches) are multiplied in turn, as a decode step does, with 1 and 8 activation
rows. Kernels: oneDNN's packed float32 GEMM (the `onednn` kernel) and the compiled kernels of
pipeline.runtime.native on float32 (the `native` kernel's GEMV), int8, int4 (groups of 64) and FP8 weights. Prints
the milliseconds per step, the weight bytes streamed per second and each kernel's time relative to oneDNN float32 in
the same command (the figures are machine-dependent; the ratios compare across machines).

`--before REV` also builds the compiled kernels of another revision of this repository (its `quant_gemm.cpp`, with
this tree's flags, under its own module name in a temporary directory) and times both modules' calls on the same
weights in the same process, alternately for `--rounds` rounds (best of each), with int4 in groups of 64 with zeros
(GPTQ's form) added; it prints the after/before time ratio per format and batch.

`--isas` compares, the same way, the weight kernels' AVX2 instance ("before") with their AVX-512 one ("after") in
this tree's module, on a CPU with AVX-512. Without either flag the compiled kernels run their default instance
(pipeline.runtime.native: the widest, or $TRTLLM_PIPELINE_NATIVE_ISA).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
FORMATS = {"f32": 3, "int8": 0, "int4": 1, "fp8": 2}  # the compiled kernel's storage formats
# --before's further forms of a call: (stored format, a zero per group, a pre-quant factor, activation quantization
# 0 none / 1 INT8 / 2 FP8): GPTQ's zeros, AWQ's factor, W4A8's FP8 activations and SmoothQuant's INT8 activations
FORMS = {"int4+zero": ("int4", True, False, 0), "int4+prequant": ("int4", False, True, 0),
         "int4+fp8 act": ("int4", False, True, 2), "int8+int8 act": ("int8", False, False, 1)}


def native_weights(fmt: str, layers: int):
    import torch

    from pipeline.runtime.quant_linear import pack_int4_blocks

    out = []
    for _ in range(layers):
        for n, k in SHAPES:
            q = torch.randint(-7, 8, (n, k), dtype=torch.int8)
            w = {"f32": lambda: torch.randn(n, k), "int8": lambda: q, "int4": lambda: pack_int4_blocks(q),
                 "fp8": lambda: torch.randn(n, k).to(torch.float8_e4m3fn).view(torch.uint8)}[fmt]()
            groups = k // 64 if fmt == "int4" else 1
            out.append((w.contiguous(), k, torch.rand(n, groups)))
    return out


def kernels_of_revision(rev: str, into: Path):
    """The compiled kernels of revision `rev` of this repository, built from its quant_gemm.cpp under their own name."""
    from torch.utils import cpp_extension

    from pipeline.runtime import native

    shown = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:pipeline/runtime/native/quant_gemm.cpp"],
                           capture_output=True)
    if shown.returncode != 0:
        sys.exit(f"--before {rev}: no pipeline/runtime/native/quant_gemm.cpp there ({shown.stderr.decode().strip()})")
    source = into / "quant_gemm_before.cpp"
    source.write_bytes(shown.stdout)
    identity = hashlib.sha256(shown.stdout)
    for header in native.HEADERS:  # the headers it includes, where the revision has them
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{header.relative_to(REPO).as_posix()}"],
                              capture_output=True)
        if text.returncode == 0:
            (into / header.name).write_bytes(text.stdout)
            identity.update(text.stdout)
    name = "quant_gemm_before_" + identity.hexdigest()[:12]
    print(f"building the compiled kernels of {rev} (about a minute)", file=sys.stderr)
    return cpp_extension.load(name=name, sources=[str(source)], extra_cflags=list(native.CFLAGS),
                              extra_ldflags=list(native.LDFLAGS), build_directory=str(into))


class Instance:
    """A side of `compare`: a compiled module's calls, after `activate()` has set its weight kernels' instance (`isa`
    "avx2" or "avx512"; None keeps the module's own, as a revision built before the instances were split has)."""

    def __init__(self, module, isa: str | None = None):
        self.module, self.isa = module, isa

    def activate(self) -> None:
        if self.isa is not None:
            self.module.set_isa(self.isa)

    def __getattr__(self, name):
        return getattr(self.module, name)


def compare(before: Instance, after: Instance, args) -> None:
    """Both modules' calls on the same weights, alternately, best of `rounds` x `steps` each; after/before ratios."""
    import torch

    from decode_speed import timed

    print(f"{'format':<14} {'batch':>5} {'before ms':>10} {'after ms':>9} {'after/before':>13}")
    for fmt, (stored, zero, prequant, act_kind) in {**{f: (f, False, False, 0) for f in FORMATS}, **FORMS}.items():
        code, weights = FORMATS[stored], native_weights(stored, args.layers)
        zeros = [torch.rand(s.shape) if zero else None for _, _, s in weights]
        factors = {k: torch.rand(k) + 0.5 if prequant else None for _, k in SHAPES}
        act_scale = torch.tensor([0.05]) if act_kind else None
        for batch in (1, 8):
            xs = {k: torch.randn(batch, k) for k in {k for _, k in SHAPES}}

            def step(module):
                module.activate()
                for (w, k, s), z in zip(weights, zeros):
                    module.quant_linear(xs[k], w, code, k, s, z, None, factors[k], act_scale, act_kind)

            best = {"before": float("inf"), "after": float("inf")}
            for _ in range(args.rounds):
                for label, module in (("before", before), ("after", after)):
                    best[label] = min(best[label], timed(lambda: step(module), args.steps))
            print(f"{fmt:<14} {batch:>5} {best['before'] * 1e3:>10.2f} {best['after'] * 1e3:>9.2f} "
                  f"{best['after'] / best['before']:>12.2f}x", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--before", metavar="REV", help="compare with the compiled kernels of this git revision")
    p.add_argument("--isas", action="store_true", help="compare the AVX2 and AVX-512 instances of the weight kernels")
    p.add_argument("--rounds", type=int, default=3, help="alternations of before and after (--before, --isas)")
    args = p.parse_args()
    import torch

    from decode_speed import timed  # a warm-up call, then the best of `steps` (this script's folder is on sys.path)

    from pipeline.runtime import native

    torch.set_num_threads(args.threads)
    kernels = native.load()
    if kernels is None:
        sys.exit("the compiled kernels of pipeline.runtime.native are not available here")
    if args.isas:
        if "avx512" not in kernels.supported_isas():
            sys.exit("--isas: this CPU has no AVX-512, so the weight kernels have only their AVX2 instance here")
        compare(Instance(kernels, "avx2"), Instance(kernels, "avx512"), args)
        return
    if args.before:
        with tempfile.TemporaryDirectory(prefix="linear_kernels_") as tmp:
            compare(Instance(kernels_of_revision(args.before, Path(tmp))), Instance(kernels), args)
        return
    rows = {}
    for batch in (1, 8):
        xs = {k: torch.randn(batch, k) for k in {k for _, k in SHAPES}}
        f32 = native_weights("f32", args.layers)
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w, _, _ in f32]

        def onednn():
            for w, (_, k, _) in zip(packed, f32):
                torch.ops.mkldnn._linear_pointwise(xs[k], w, None, "none", [], "")

        rows[("onednn f32", batch)] = (timed(onednn, args.steps), sum(w.numel() * 4 for w, _, _ in f32))
        del packed
        for fmt, code in FORMATS.items():
            weights = f32 if fmt == "f32" else native_weights(fmt, args.layers)

            def step(weights=weights, code=code):
                for w, k, s in weights:
                    kernels.quant_linear(xs[k], w, code, k, s, None, None, None, None, 0)

            rows[(f"native {fmt}", batch)] = (timed(step, args.steps),
                                              sum(w.numel() * w.element_size() for w, _, _ in weights))
    print(f"{'kernel':<12} {'batch':>5} {'ms/step':>8} {'GB/s':>6} {'vs onednn f32':>14}")
    for (name, batch), (secs, nbytes) in rows.items():
        base = rows[("onednn f32", batch)][0]
        print(f"{name:<12} {batch:>5} {secs * 1e3:>8.2f} {nbytes / secs / 1e9:>6.1f} {secs / base:>13.2f}x")


if __name__ == "__main__":
    main()
