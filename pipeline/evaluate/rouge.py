"""ROUGE as TensorRT-LLM's summarize.py reported it: the `rouge` metric of HF `evaluate`, which wraps Google's
`rouge_score` (rouge1, rouge2, rougeL, rougeLsum; default tokenizer; stemming off unless asked) and aggregates with
its bootstrap (numpy seeded 0), reporting mid F-measures x 100. Computed here with `rouge_score` directly."""

from __future__ import annotations

import logging

import numpy as np
from rouge_score import rouge_scorer, scoring

# rouge_score logs "Using default tokenizer." through absl at INFO for every scorer it builds: console noise.
logging.getLogger("absl").setLevel(logging.WARNING)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_per_sample(predictions: list[str], references: list[str], use_stemmer: bool = False) -> list[dict[str, float]]:
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    return [{k: v.fmeasure * 100 for k, v in scorer.score(ref, pred).items()} for pred, ref in zip(predictions, references)]


def rouge(predictions: list[str], references: list[str], use_stemmer: bool = False) -> dict[str, float]:
    return rouge_with_intervals(predictions, references, use_stemmer)[0]


def rouge_with_intervals(predictions: list[str], references: list[str],
                         use_stemmer: bool = False) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The mid F-measures and their 95% bootstrap intervals ([low, high], x 100) from the same aggregation."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("rouge needs as many predictions as references, at least one")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    aggregator = scoring.BootstrapAggregator()
    for pred, ref in zip(predictions, references):
        aggregator.add_scores(scorer.score(ref, pred))
    np.random.seed(0)  # the bootstrap draws from numpy's global generator, as in summarize.py
    result = aggregator.aggregate()
    return ({k: round(result[k].mid.fmeasure * 100, 4) for k in ROUGE_TYPES},
            {k: [round(result[k].low.fmeasure * 100, 4), round(result[k].high.fmeasure * 100, 4)] for k in ROUGE_TYPES})
