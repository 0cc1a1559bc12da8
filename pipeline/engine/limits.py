"""Build limits, named as trtllm-build names them, checked against the model before anything is built."""

from __future__ import annotations

from typing import Any, Mapping

from pipeline.errors import PipelineError

# Rope scaling kinds the CPU runtime computes; TensorRT-LLM applies the factor to max_seq_len deduction except for
# the kinds that carry their own original length.
SUPPORTED_ROPE_SCALING = {"none", "default", "linear", "llama3"}
FACTOR_EXTENDS_CONTEXT = {"linear", "dynamic", "yarn"}


def rope_kind(ckpt: Mapping[str, Any]) -> str:
    scaling = ckpt.get("rotary_scaling") or {}
    return scaling.get("rope_type", scaling.get("type", "none"))


def resolve_limits(build: Mapping[str, Any], ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The engine's build_config: user limits with defaults deduced as trtllm-build deduces them, then checked."""
    mpe = ckpt.get("max_position_embeddings") or 2048
    kind = rope_kind(ckpt)
    factor = float((ckpt.get("rotary_scaling") or {}).get("factor", 1.0)) if kind in FACTOR_EXTENDS_CONTEXT else 1.0
    allowed = int(mpe * factor)
    max_seq_len = build.get("max_seq_len") or allowed
    limits = {
        "max_batch_size": int(build["max_batch_size"]),
        "max_input_len": int(build["max_input_len"]),
        "max_seq_len": int(max_seq_len),
        "max_beam_width": int(build["max_beam_width"]),
        "max_num_tokens": int(build.get("max_num_tokens") or build["max_batch_size"] * build["max_input_len"]),
        "gather_context_logits": bool(build["gather_context_logits"]),
        "gather_generation_logits": bool(build["gather_generation_logits"]),
        "logits_dtype": build.get("logits_dtype", "float32"),
    }
    problems = []
    for key in ("max_batch_size", "max_input_len", "max_seq_len", "max_beam_width", "max_num_tokens"):
        if limits[key] < 1:
            problems.append(f"build.{key}={limits[key]} must be >= 1")
    if limits["max_input_len"] > limits["max_seq_len"]:
        problems.append(f"build.max_input_len={limits['max_input_len']} exceeds build.max_seq_len={limits['max_seq_len']}")
    if limits["max_seq_len"] > allowed:
        why = f"max_position_embeddings={mpe}" + (f" x rope scaling factor {factor}" if factor != 1.0 else "")
        problems.append(f"build.max_seq_len={limits['max_seq_len']} exceeds what the model supports ({why} = {allowed})")
    if kind not in SUPPORTED_ROPE_SCALING:
        problems.append(f"rotary_scaling type {kind!r} is not supported by the cpu backend (supported: {sorted(SUPPORTED_ROPE_SCALING)})")
    if problems:
        raise PipelineError("; ".join(problems))
    return limits
