"""The reference stage: the source model run by `transformers` over an evaluation's prompts and perplexity windows,
once per model + dtype + evaluation settings + dataset (+ the two build limits that truncate prompts), never per
engine: every quantization, mapping and backend of a sweep is compared with the same cached reference.

Artifact: `reference.json` (prompts, output tokens and texts, per-sample ROUGE, perplexity, timing) and, when there
are perplexity windows, the reference distributions the engine's KL divergence is measured against:
`logprobs.safetensors` (evaluate.kl_reference=full: every token's log-prob per window position, uint16-quantized) or
`topk.safetensors` (kl_reference=topk: the top-64 log-probs and token ids); see pipeline.evaluate.stats."""

from __future__ import annotations

import json
import logging
from typing import Any

from pipeline.errors import PipelineError
from pipeline.evaluate.ppl import perplexity
from pipeline.evaluate.request import build_request, evaluate_fingerprint, n_samples
from pipeline.executor import StageContext, stage
from pipeline.stages.convert import source_fingerprint

log = logging.getLogger(__name__)

STAGE_VERSION = 2  # 2: the full distributions (kl_reference=full) beside the top-k form
REFERENCE_FILE = "reference.json"
KL_FILES = {"full": "logprobs.safetensors", "topk": "topk.safetensors"}

# The evaluation settings the reference's result depends on; batch_size and max_ite enter only as their product.
REFERENCE_KEYS = ("task", "dataset", "dataset_config", "dataset_split", "input_field", "reference_field", "shuffle",
                  "prompt_template", "system_prompt", "max_input_length", "output_len", "num_beams", "length_penalty",
                  "early_stopping", "temperature",
                  "top_k", "top_p", "random_seed", "use_stemmer", "data_type", "eval_ppl", "ppl_dataset",
                  "ppl_window", "ppl_max_windows", "reference_batch_size", "kl_reference")


def reference_view(config: dict[str, Any]) -> dict[str, Any]:
    ev, build = config["evaluate"], config["build"]
    return {"model": config["model"], "dtype": config["dtype"],
            "evaluate": {**{k: ev[k] for k in REFERENCE_KEYS}, "n_samples": n_samples(ev)},
            "build": {"max_input_len": build["max_input_len"], "max_seq_len": build["max_seq_len"]}}


def reference_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    return {"model": source_fingerprint(config), **evaluate_fingerprint(config)}


def wants_reference(config: dict[str, Any]) -> bool:
    return bool(config["evaluate"]["test_hf"])


@stage("reference", version=STAGE_VERSION, reads=("evaluate", "model", "dtype", "build"), view=reference_view,
       fingerprint=reference_fingerprint, unkeyed=("model.path", "model.package"))
def reference_stage(ctx: StageContext) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from pipeline.evaluate.rouge import rouge_per_sample, rouge_with_intervals

    from pipeline.convert.sources import open_source
    from pipeline.convert.sources.locate import resolve_model_path

    cfg = ctx.config
    ev, model_cfg = dict(cfg["evaluate"]), cfg["model"]
    dtype = getattr(torch, ev["data_type"] or cfg["dtype"])
    source = open_source(model_cfg["source"], resolve_model_path(model_cfg["path"], model_cfg["package"]))
    try:
        tokenizer = source.tokenizer()
        if tokenizer is None:
            raise PipelineError(f"the reference needs a tokenizer and the model at {model_cfg['path']} carries none")
        max_input_len, max_seq_len = _sequence_limits(source, cfg)
        samples, request = build_request(ev, tokenizer, max_input_len, max_seq_len, count=ev["n_samples"])
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' GGUF loading bars are not this run's progress
        model = source.transformers_model(dtype)
    finally:
        source.close()
    from pipeline.evaluate.hf_eval import run_hf_eval

    kl_form = _kl_form(ev) if request["ppl_windows"] else None
    result = run_hf_eval(model, request, ev["reference_batch_size"], ctx.progress, kl_form=kl_form)
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in result["outputs"]]
    record: dict[str, Any] = {
        "n": len(samples), "prompts": request["prompts"], "ppl_windows": request["ppl_windows"],
        "outputs": result["outputs"], "texts": texts, "ids": [s.id for s in samples],
        "references": [s.reference for s in samples], "generated_tokens": result["generated_tokens"],
        "seconds": round(result["seconds"], 3), "batch_size": result["batch_size"],
        "ppl_nll": result["ppl_nll"], "ppl_tokens": result["ppl_tokens"],
    }
    if samples:
        record["rouge"], record["rouge_ci"] = rouge_with_intervals(texts, record["references"], ev["use_stemmer"])
        record["rouge_per_sample"] = rouge_per_sample(texts, record["references"], ev["use_stemmer"])
    if result["ppl_tokens"]:
        record["ppl"] = round(perplexity(result["ppl_nll"], result["ppl_tokens"]), 6)
    if "kl_reference" in result:
        save_file({k: v.contiguous() for k, v in result["kl_reference"].items()}, str(ctx.out_dir / KL_FILES[kl_form]),
                  metadata={"form": kl_form})
    (ctx.out_dir / REFERENCE_FILE).write_text(json.dumps(record) + "\n")
    metrics: dict[str, Any] = {"n": record["n"], "batch_size": record["batch_size"], "seconds": record["seconds"]}
    metrics.update(record.get("rouge", {}))
    if "ppl" in record:
        metrics["ppl"] = record["ppl"]
    return metrics


def _sequence_limits(source, cfg: dict[str, Any]) -> tuple[int, int]:
    """The prompt limits every engine built from this model with these build settings truncates to: limits left
    unset are derived from the checkpoint config the converter would write (shapes only, no tensor data read)."""
    from pipeline.convert.converter import prepare
    from pipeline.convert.registry import MappingArgs
    from pipeline.engine.limits import sequence_limits

    ckpt = prepare(source, cfg["dtype"], MappingArgs(1, 1), cfg["model"]["architecture"]).config
    return sequence_limits(cfg["build"], ckpt)


def _kl_form(ev: dict[str, Any]) -> str:
    form = str(getattr(ev["kl_reference"], "value", ev["kl_reference"]))
    if form not in KL_FILES:
        raise PipelineError(f"evaluate.kl_reference={form!r}: expected one of {', '.join(KL_FILES)}")
    return form


def kl_reference_file(artifact) -> tuple[str, Any] | None:
    """The reference artifact's stored distributions: (form, path), or None when it has none."""
    for form, name in KL_FILES.items():
        if (artifact / name).is_file():
            return form, artifact / name
    return None


def load_reference(artifact) -> dict[str, Any]:
    return json.loads((artifact / REFERENCE_FILE).read_text())
