"""Build engines from tiny HF models with the real converter and backend, for runtime tests."""

from __future__ import annotations

from pathlib import Path

from pipeline.convert.converter import convert
from pipeline.convert.registry import MappingArgs
from pipeline.convert.sources import open_source
from pipeline.engine.cpu import BACKEND

BUILD = {"max_batch_size": 4, "max_input_len": 32, "max_seq_len": 64, "max_beam_width": 1, "max_num_tokens": None,
         "gather_context_logits": True, "gather_generation_logits": True, "logits_dtype": "float32"}


def build_engine(model_dir: Path, out: Path, tp: int = 1, pp: int = 1, dtype: str = "float32", source: str = "hf",
                 moe_ep_size: int | None = None, **build) -> Path:
    ckpt, engine = out / "ckpt", out / "engine"
    src = open_source(source, model_dir)
    try:
        convert(src, ckpt, dtype, MappingArgs(tp, pp, moe_ep_size=moe_ep_size), progress=False)
    finally:
        src.close()
    BACKEND.build(ckpt, engine, {**BUILD, **build})
    return engine
