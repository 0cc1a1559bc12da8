"""Prompts: summarize.py's `article + " TL;DR: "` or the tokenizer's chat template, left-truncated to
`max_input_length` tokens so the end of the prompt (the instruction) survives."""

from __future__ import annotations

from typing import Any

from pipeline.errors import PipelineError

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant, please summarize the article entered by the user with one or two sentences."


def tldr_text(article: str) -> str:
    """summarize.py's default: append " TL;DR: ", strip, and glue split contractions back (" n't" -> "n't")."""
    return (article + " TL;DR: ").strip().replace(" n't", "n't")


def encode_prompt(tokenizer, article: str, template: str, system_prompt: str | None, max_input_length: int) -> list[int]:
    return truncate_prompt(prompt_tokens(tokenizer, article, template, system_prompt), max_input_length)


def truncate_prompt(ids: list[int], max_input_length: int) -> list[int]:
    """summarize.py's tokenizer is loaded with truncation_side='left': a longer prompt keeps its last
    max_input_length tokens, so the end of the prompt (the instruction) survives."""
    return list(ids[-max_input_length:])


def prompt_tokens(tokenizer, article: str, template: str, system_prompt: str | None) -> list[int]:
    """The whole prompt's token ids, before truncation."""
    if template == "tldr":
        ids = tokenizer.encode(tldr_text(article))
    elif template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise PipelineError("evaluate.prompt_template=chat needs a tokenizer with a chat template; use tldr")
        messages: list[dict[str, Any]] = [{"role": "user", "content": article}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        raise PipelineError(f"evaluate.prompt_template={template!r}: use tldr or chat")
    return list(ids)
