"""Sparse against dense MoE in the cpu engine: a tiny random Mixtral with 8 experts, top-2, in one process.

    python benchmarks/moe_speed.py [--hidden 512] [--intermediate 1792] [--layers 4] [--new_tokens 64]

The same engine and the same requests run with the runtime's sparse MoE (each expert only on the tokens routed to it)
and with the dense formulation kept for export (every expert on every token), alternately; one JSON line per case
with tokens per second and the ratio sparse / dense (same command, same process). Cases: decode at batch 1 and 8,
and a 256-token prefill. The outputs of both formulations are checked to be the same tokens.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def tiny_mixtral(out: Path, hidden: int, intermediate: int, layers: int) -> Path:
    import transformers

    config = transformers.MixtralConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=intermediate,
                                        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                                        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).eval().save_pretrained(out)
    return out


def build(model_dir: Path, out: Path) -> Path:
    from pipeline.convert.converter import convert
    from pipeline.convert.registry import MappingArgs
    from pipeline.convert.sources import open_source
    from pipeline.engine.cpu import BACKEND

    src = open_source("hf", model_dir)
    try:
        convert(src, out / "ckpt", "float32", MappingArgs(), progress=False)
    finally:
        src.close()
    BACKEND.build(out / "ckpt", out / "engine", {"max_batch_size": 8, "max_input_len": 256, "max_seq_len": 512,
                                                 "max_beam_width": 1, "max_num_tokens": None,
                                                 "gather_context_logits": False, "gather_generation_logits": False})
    return out / "engine"


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1792)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from pipeline.runtime import ModelRunner

    with tempfile.TemporaryDirectory() as tmp:
        engine = build(tiny_mixtral(Path(tmp) / "hf", args.hidden, args.intermediate, args.layers), Path(tmp) / "b")
        runner = ModelRunner.from_dir(engine)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 1024, (16,), generator=g) for _ in range(8)]
        long_prompt = [torch.randint(0, 1024, (256,), generator=g)]
        n = args.new_tokens
        cases = {
            "decode_b1": (lambda: runner.generate(prompts[:1], max_new_tokens=n, end_id=-1, pad_id=0), n),
            "decode_b8": (lambda: runner.generate(prompts, max_new_tokens=n, end_id=-1, pad_id=0), 8 * n),
            "prefill_256": (lambda: runner.generate(long_prompt, max_new_tokens=1, end_id=-1, pad_id=0), 256),
        }
        outputs = {}
        for sparse in (True, False):
            runner.model.set_moe_formulation(sparse)
            outputs[sparse] = runner.generate(prompts, max_new_tokens=n, end_id=-1, pad_id=0)  # also a warm-up
        same_tokens = bool(torch.equal(outputs[True], outputs[False]))
        for case, (fn, tokens) in cases.items():
            seconds = {}
            for sparse in (True, False, True, False):  # alternate, keep the best of each
                runner.model.set_moe_formulation(sparse)
                seconds[sparse] = min(seconds.get(sparse, float("inf")), best_of(fn, args.repeats))
            print(json.dumps({"case": case, "experts": 8, "top_k": 2, "hidden": args.hidden,
                              "intermediate": args.intermediate, "layers": args.layers,
                              "sparse_tokens_per_second": round(tokens / seconds[True], 1),
                              "dense_tokens_per_second": round(tokens / seconds[False], 1),
                              "sparse_over_dense": round(seconds[False] / seconds[True], 2),
                              "same_tokens": same_tokens}), flush=True)


if __name__ == "__main__":
    main()
