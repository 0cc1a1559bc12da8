"""The decode speed probe on a scripted runner with a fake clock: which prompt it feeds, at which batches, and the
time to first token and decode tokens/s it derives from the step times."""

from __future__ import annotations

import pytest

from pipeline.evaluate import speed
from pipeline.evaluate.speed import measure_speed, probe_prompt

PREFILL_PER_ROW, STEP = 0.5, 0.25  # fake seconds: prefill per batch row, one decode step of the whole batch


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class ScriptedRunner:
    """generate() advances the clock: prefill (rows x PREFILL_PER_ROW) before the first token, STEP per token after."""

    def __init__(self, clock: Clock, max_batch: int = 8, max_input: int = 512, max_seq: int = 600):
        self.clock, self.calls = clock, []
        self.limits = {"max_batch_size": max_batch, "max_input_len": max_input, "max_seq_len": max_seq}

    def generate(self, ids, max_new_tokens, end_id, pad_id, streaming=False):
        self.calls.append((len(ids), [t.tolist() for t in ids], max_new_tokens, end_id, streaming))
        steps = self._steps(len(ids), max_new_tokens)
        if streaming:
            return steps
        for _ in steps:
            pass

    def _steps(self, rows, n):
        self.clock.now += rows * PREFILL_PER_ROW
        for i in range(n):
            if i:
                self.clock.now += STEP
            yield i


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(speed.time, "perf_counter", c)
    return c


def test_ttft_and_decode_tokens_per_second_at_batch_1_and_max_batch(clock):
    runner = ScriptedRunner(clock, max_batch=8)
    request = {"prompts": [list(range(300)), [1, 2]], "ppl_windows": []}
    out = measure_speed(runner, request, steps=16, prompt_len=128)
    assert out["prompt_tokens"] == 128 and out["decode_steps"] == 16 and out["max_batch_size"] == 8
    # batch 1: first token after 1 x 0.5 s; 16 steps of 0.25 s give 16 tokens in 4 s
    assert out["batch_1"] == {"ttft_seconds": 0.5, "decode_tokens_per_second": 4.0}
    # batch 8: first token after 8 x 0.5 s; 16 steps give 8 x 16 tokens in 4 s
    assert out["batch_n"] == {"ttft_seconds": 4.0, "decode_tokens_per_second": 32.0}
    timed = [c for c in runner.calls if c[4]]
    assert [c[0] for c in timed] == [1, 8] and all(c[2] == 17 and c[3] == -1 for c in timed)
    assert len(runner.calls) == 4 and all(c[2] == speed.WARMUP_TOKENS for c in runner.calls if not c[4])
    assert timed[1][1] == [list(range(172, 300))] * 8  # the first prompt's last 128 tokens, the same in every row


def test_prompt_choice_and_room():
    assert probe_prompt({"prompts": [], "ppl_windows": [[5, 6, 7, 8]]}, 3, 10) == [6, 7, 8]
    assert probe_prompt({"prompts": [[1, 2, 3]], "ppl_windows": []}, 128, 2) == [2, 3]
    assert probe_prompt({"prompts": [], "ppl_windows": []}, 128, 100) is None


def test_probe_fits_the_engine_limits_or_is_off(clock):
    runner = ScriptedRunner(clock, max_batch=1, max_input=512, max_seq=40)
    out = measure_speed(runner, {"prompts": [list(range(300))]}, steps=16, prompt_len=128)
    assert out["prompt_tokens"] == 40 - 17 and out["max_batch_size"] == 1  # prompt + 17 tokens fit max_seq_len
    assert measure_speed(runner, {"prompts": [[1, 2]]}, steps=0, prompt_len=128) is None
    assert measure_speed(ScriptedRunner(clock, max_seq=17), {"prompts": [[1, 2]]}, steps=16, prompt_len=128) is None
