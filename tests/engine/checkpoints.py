"""Tiny checkpoints for backend tests, converted by the real converter."""

from __future__ import annotations

from pathlib import Path

from pipeline.convert.converter import convert
from pipeline.convert.registry import MappingArgs
from pipeline.convert.sources import open_source

BUILD = {"backend": "cpu", "max_batch_size": 4, "max_input_len": 32, "max_seq_len": 64, "max_beam_width": 1,
         "max_num_tokens": None, "gather_context_logits": True, "gather_generation_logits": True,
         "logits_dtype": "float32", "smoke_test_tokens": 0}


def make_checkpoint(model_dir: Path, out: Path, tp: int = 1, pp: int = 1, dtype: str = "float32") -> Path:
    src = open_source("hf", model_dir)
    try:
        convert(src, out, dtype, MappingArgs(tp, pp), progress=False)
    finally:
        src.close()
    return out
