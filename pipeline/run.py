"""Generate text with an engine: `python -m pipeline.run --engine_dir DIR --input_text "Hello"`.

An engine with several ranks is started under `mpirun -n <world_size>` automatically; running that by hand works
too: `mpirun -n 2 python -m pipeline.run --engine_dir DIR --input_text "Hello"`. Only rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__.splitlines()[0])
    p.add_argument("--engine_dir", type=Path, required=True)
    p.add_argument("--input_text", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--input_ids", action="append", help="a prompt as comma-separated token ids (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--tokenizer_dir", type=Path, help="defaults to <engine_dir>/tokenizer")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=1)
    p.add_argument("--top_p", type=float, default=0.0)
    p.add_argument("--random_seed", type=int)
    p.add_argument("--end_id", type=int, help="defaults to the tokenizer's eos token")
    p.add_argument("--json", action="store_true", help="print one JSON line (ids, text, timings)")
    return p.parse_args(argv)


def load_tokenizer(engine_dir: Path, tokenizer_dir: Path | None):
    from transformers import AutoTokenizer

    path = tokenizer_dir or engine_dir / "tokenizer"
    if not path.is_dir():
        return None
    return AutoTokenizer.from_pretrained(path)


def encode(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer.encode(text)


def generate_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.runtime import ModelRunner

    runner = ModelRunner.from_dir(args.engine_dir)
    tokenizer = load_tokenizer(args.engine_dir, args.tokenizer_dir)
    prompts: list[list[int]] = [[int(t) for t in s.split(",")] for s in args.input_ids or []]
    if args.input_text:
        if tokenizer is None:
            raise PipelineError(f"--input_text needs a tokenizer: {args.engine_dir / 'tokenizer'} is missing; "
                                "pass --tokenizer_dir or --input_ids")
        prompts += [encode(tokenizer, text, args.chat) for text in args.input_text]
    if not prompts:
        raise PipelineError("give a prompt with --input_text or --input_ids")
    end_id = args.end_id if args.end_id is not None else (tokenizer.eos_token_id if tokenizer is not None else -1)
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else max(end_id, 0)
    started = time.perf_counter()
    out = runner.generate([torch.tensor(p) for p in prompts], max_new_tokens=args.max_new_tokens, end_id=end_id,
                          pad_id=pad_id, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          random_seed=args.random_seed, return_dict=True)
    seconds = time.perf_counter() - started
    lengths = out["sequence_lengths"][:, 0].tolist()
    generated = [out["output_ids"][i, 0, len(p): lengths[i]].tolist() for i, p in enumerate(prompts)]
    result = {
        "rank": runner.dist.rank,
        "output_ids": generated,
        "load_seconds": round(runner.load_seconds, 3),
        "seconds": round(seconds, 3),
        "tokens_per_second": round(sum(len(g) for g in generated) / seconds, 2) if seconds > 0 else None,
    }
    if tokenizer is not None:
        result["text"] = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    return result


def smoke_test(engine_dir: Path, max_new_tokens: int) -> dict[str, Any]:
    """Load the engine on all its ranks and greedily generate from a fixed prompt; report load time and speed."""
    from pipeline.runtime.launch import engine_world_size, run_module_on_ranks
    from pipeline.runtime.parallel import mpi_world

    world = engine_world_size(engine_dir)
    args = ["--engine_dir", str(engine_dir), "--input_ids", "1,2,3,4,5,6,7,8", "--max_new_tokens",
            str(max_new_tokens), "--json"]
    if world == 1 and mpi_world()[1] == 1:
        result = generate_from_args(parse_args(args))
    else:
        lines = [line for line in run_module_on_ranks(world, "pipeline.run", args).splitlines() if line.startswith("{")]
        result = json.loads(lines[-1])
    return {"smoke_load_seconds": result["load_seconds"], "smoke_tokens_per_second": result["tokens_per_second"],
            "smoke_world_size": world}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from pipeline.runtime.launch import engine_world_size, mpirun_command, rank_environment
        from pipeline.runtime.parallel import mpi_world

        world = engine_world_size(args.engine_dir)
        if world > 1 and mpi_world()[1] == 1:  # started by hand without mpirun: relaunch on all ranks
            cmd = mpirun_command(world, "pipeline.run", sys.argv[1:] if argv is None else argv)
            os.execve(cmd[0], cmd, rank_environment(cmd[0]))
        result = generate_from_args(args)
    except PipelineError as e:
        from pipeline.runtime.parallel import report_rank_error

        return report_rank_error(e)
    if result["rank"] == 0:
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            for i, ids in enumerate(result["output_ids"]):
                print(f"[{i}] {result['text'][i] if 'text' in result else ids}")
            print(f"({result['tokens_per_second']} tokens/s, engine loaded in {result['load_seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
