"""What an evaluation asks of a model, engine or transformers alike: the samples, their encoded prompts, the
perplexity windows and the generation settings. The engine and the reference build it from the same settings and
limits, so the reference computed once serves every engine built with those limits."""

from __future__ import annotations

from typing import Any

from pipeline.errors import PipelineError
from pathlib import Path

from pipeline.evaluate.data import SHIPPED_PPL_TEXT, dataset_fingerprint, load_samples, load_text
from pipeline.evaluate.ppl import windows
from pipeline.evaluate.prompts import prompt_tokens, truncate_prompt


def evaluate_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The identity of the evaluation's data files (the summarization set, the perplexity text)."""
    from pipeline.convert.sources.files import file_sha256

    ev = config["evaluate"]
    fp: dict[str, Any] = {}
    if ev["task"] == "summarize":
        fp["dataset"] = dataset_fingerprint(ev["dataset"], ev["dataset_split"])
    if has_ppl_windows(ev):
        text = Path(ev["ppl_dataset"]).expanduser() if ev["ppl_dataset"] else SHIPPED_PPL_TEXT
        fp["ppl_dataset"] = file_sha256(text) if text.is_file() else str(text)
    return fp


def has_ppl_windows(ev: dict[str, Any]) -> bool:
    """Whether the evaluation scores perplexity windows (task=ppl, or eval_ppl beside summarization)."""
    return ev["task"] == "ppl" or bool(ev["eval_ppl"])


def n_samples(ev: dict[str, Any]) -> int:
    return ev["max_ite"] * ev["batch_size"]


def build_request(ev: dict[str, Any], tokenizer, max_input_len: int, max_seq_len: int,
                  count: int | None = None) -> tuple[list, dict[str, Any]]:
    """Samples and the request for them, prompts left-truncated to what the limits leave for the output."""
    max_input = min(ev["max_input_length"], max_input_len, max_seq_len - ev["output_len"])
    if max_input < 1:
        raise PipelineError(f"evaluate.output_len={ev['output_len']} leaves no room for a prompt in max_seq_len={max_seq_len}")
    samples = []
    if ev["task"] == "summarize":
        samples = load_samples(ev["dataset"], ev["input_field"], ev["reference_field"], ev["dataset_split"],
                               ev["dataset_config"], ev["random_seed"] if ev["shuffle"] else None)
        samples = samples[: n_samples(ev) if count is None else count]
    ppl_windows = []
    if has_ppl_windows(ev):
        ids = tokenizer.encode(load_text(ev["ppl_dataset"]))
        ppl_windows = windows(ids, min(ev["ppl_window"], max_input_len), ev["ppl_max_windows"])
    end_id = tokenizer.eos_token_id
    whole = [prompt_tokens(tokenizer, s.input, ev["prompt_template"], ev["system_prompt"]) for s in samples]
    request = {
        "prompts": [truncate_prompt(ids, max_input) for ids in whole],
        # samples longer than the prompt may be (as summarize.py, they keep their last max_input tokens)
        "max_prompt_tokens": max_input,
        "truncated_samples": sum(len(ids) > max_input for ids in whole),
        "ppl_windows": ppl_windows,
        "batch_size": ev.get("batch_size", 1), "max_new_tokens": ev["output_len"], "end_id": end_id,
        "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id,
        "temperature": ev["temperature"], "top_k": ev["top_k"], "top_p": ev["top_p"], "num_beams": ev["num_beams"],
        "length_penalty": ev["length_penalty"], "early_stopping": ev["early_stopping"],
        "random_seed": ev["random_seed"],
    }
    return samples, request
