"""A dataset sample longer than the prompt limit is truncated as summarize.py does (its tokenizer truncates on the
left: the last tokens, with the " TL;DR:" instruction, are kept), and the report counts those samples."""

from __future__ import annotations

import json

from pipeline.evaluate.request import build_request
from pipeline.schemas import schema_errors
from tests.recipes_util import compose_recipe


class WordTokenizer:
    """One token per word: token i is the i-th word's index in the text."""

    chat_template = None
    eos_token_id = 0
    pad_token_id = None

    def encode(self, text):
        return list(range(1, len(text.split()) + 1))


def test_long_samples_keep_their_last_tokens_and_are_counted(tmp_path):
    data = tmp_path / "eval.jsonl"
    rows = [{"article": "w " * 30, "highlights": "a"}, {"article": "short text", "highlights": "b"},
            {"article": "w " * 11, "highlights": "c"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = compose_recipe(["evaluate=tldr", f"evaluate.dataset={data}", "evaluate.max_ite=3", "evaluate.batch_size=1",
                         "evaluate.max_input_length=12", "evaluate.output_len=4"])["evaluate"]
    samples, request = build_request(ev, WordTokenizer(), max_input_len=64, max_seq_len=128)
    assert len(samples) == 3 and request["max_prompt_tokens"] == 12
    # 31 and 12 words ("TL;DR:" included) against a limit of 12: only the first is truncated
    assert request["truncated_samples"] == 1
    assert request["prompts"][0] == list(range(20, 32))  # the last 12 tokens; 31 = "TL;DR:"
    assert request["prompts"][1] == [1, 2, 3] and request["prompts"][2] == list(range(1, 13))
    # the engine's limits can be the tighter bound: max_seq_len - output_len = 6 truncates all three
    _, tight = build_request(ev, WordTokenizer(), max_input_len=64, max_seq_len=10)
    assert tight["max_prompt_tokens"] == 6 and tight["truncated_samples"] == 2 + (len(rows[1]["article"].split()) + 1 > 6)


def test_the_report_schema_requires_the_count():
    prompt = {"template": "tldr", "system_prompt": None, "max_input_length": 12, "truncation": "left",
              "max_prompt_tokens": 12}
    report = {"task": "summarize", "n": 0, "dataset": {}, "prompt": prompt, "generation": {}, "engine_key": "k",
              "versions": {}, "engine": {}}
    assert any("truncated_samples" in e for e in schema_errors(report, "report"))
    assert not [e for e in schema_errors(report | {"prompt": prompt | {"truncated_samples": 1}}, "report")
                if "prompt" in e]
