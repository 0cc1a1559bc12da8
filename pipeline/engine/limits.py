"""Build limits, named as trtllm-build names them, derived from the model where not set, checked before building.

A limit left unset (None) is derived as trtllm-build derives it: `max_seq_len` from `max_position_embeddings` (or
2048) times the rope scaling factor (for the scaling kinds that stretch the context), `max_input_len` trtllm-build's
default 1024 clipped to `max_seq_len`, `max_num_tokens` batch x input. Only limits set explicitly can be impossible:
an explicit `max_seq_len` beyond what the model supports, or an explicit `max_input_len` beyond `max_seq_len`, is an
error, named with where the bound comes from.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from pipeline.errors import PipelineError

# Rope scaling kinds the CPU runtime computes. trtllm-build (_init_max_seq_len) multiplies max_position_embeddings
# by the scaling's `factor` for every kind but these (longrope and llama3 carry their own original length: their
# max_position_embeddings is already the long one), rounding up.
SUPPORTED_ROPE_SCALING = {"none", "default", "linear", "dynamic", "llama3", "yarn", "longrope"}
FACTOR_KEEPS_CONTEXT = {"su", "longrope", "llama3"}
TRTLLM_BUILD_MAX_INPUT_LEN = 1024  # trtllm-build's --max_input_len default


def rope_kind(ckpt: Mapping[str, Any]) -> str:
    scaling = ckpt.get("rotary_scaling") or {}
    return scaling.get("type", scaling.get("rope_type", "none"))


def model_max_seq_len(ckpt: Mapping[str, Any]) -> tuple[int, str]:
    """The longest sequence the model supports and a phrase saying where that bound comes from."""
    mpe = ckpt.get("max_position_embeddings")
    source = f"max_position_embeddings={mpe}" if mpe else "no max_position_embeddings: 2048"
    kind = rope_kind(ckpt)
    factor = float((ckpt.get("rotary_scaling") or {}).get("factor", 1.0)) if kind not in FACTOR_KEEPS_CONTEXT else 1.0
    allowed = math.ceil((mpe or 2048) * factor)
    if factor != 1.0:
        source += f" x {kind} rope scaling factor {factor:g} = {allowed}"
    return allowed, source


def sequence_limits(build: Mapping[str, Any], ckpt: Mapping[str, Any]) -> tuple[int, int]:
    """(max_input_len, max_seq_len): those the build config sets, the others derived from the model (unchecked).
    The engine and the transformers reference truncate prompts with these same two numbers."""
    allowed, _ = model_max_seq_len(ckpt)
    max_seq_len = build.get("max_seq_len") or allowed
    return int(build.get("max_input_len") or min(TRTLLM_BUILD_MAX_INPUT_LEN, max_seq_len)), int(max_seq_len)


def resolve_limits(build: Mapping[str, Any], ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The engine's build_config: the limits set, the others derived from the model, then checked."""
    allowed, source = model_max_seq_len(ckpt)
    max_input_len, max_seq_len = sequence_limits(build, ckpt)
    limits = {
        "max_batch_size": int(build["max_batch_size"]),
        "max_input_len": int(max_input_len),
        "max_seq_len": int(max_seq_len),
        "max_beam_width": int(build["max_beam_width"]),
        "max_num_tokens": int(build.get("max_num_tokens") or build["max_batch_size"] * max_input_len),
        "gather_context_logits": bool(build["gather_context_logits"]),
        "gather_generation_logits": bool(build["gather_generation_logits"]),
        "logits_dtype": build.get("logits_dtype", "float32"),
    }
    problems = []
    for key in ("max_batch_size", "max_input_len", "max_seq_len", "max_beam_width", "max_num_tokens"):
        if limits[key] < 1:
            problems.append(f"build.{key}={limits[key]} must be >= 1")
    if limits["max_input_len"] > limits["max_seq_len"]:
        bound = (f"build.max_seq_len={limits['max_seq_len']}" if build.get("max_seq_len")
                 else f"the max_seq_len the model supports ({source})")
        problems.append(f"build.max_input_len={limits['max_input_len']} exceeds {bound}")
    if limits["max_seq_len"] > allowed:
        problems.append(f"build.max_seq_len={limits['max_seq_len']} exceeds what the model supports ({source}); "
                        "leave it unset to derive it from the model")
    kind = rope_kind(ckpt)
    if kind not in SUPPORTED_ROPE_SCALING:
        problems.append(f"rotary_scaling type {kind!r} is not supported by the cpu backend (supported: {sorted(SUPPORTED_ROPE_SCALING)})")
    if problems:
        raise PipelineError("; ".join(problems))
    return limits
