"""The evaluate stage: run the engine (on all its ranks) over a dataset; ROUGE, perplexity and speed; optionally the
same through transformers; a report validated by its schema; accuracy checks that fail the run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.evaluate.data import SHIPPED_PPL_TEXT, dataset_fingerprint, load_samples, load_text
from pipeline.evaluate.engine_eval import run_engine_eval
from pipeline.evaluate.ppl import perplexity, windows
from pipeline.evaluate.prompts import encode_prompt
from pipeline.evaluate.rouge import ROUGE_TYPES, rouge, rouge_per_sample
from pipeline.executor import StageContext, library_versions, stage
from pipeline.schemas import validate

STAGE_VERSION = 1


def evaluate_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    from pipeline.convert.sources.files import file_sha256

    ev = config["evaluate"]
    fp: dict[str, Any] = {}
    if ev["task"] == "summarize":
        fp["dataset"] = dataset_fingerprint(ev["dataset"], ev["dataset_split"])
    if ev["task"] == "ppl" or ev["eval_ppl"]:
        text = Path(ev["ppl_dataset"]).expanduser() if ev["ppl_dataset"] else SHIPPED_PPL_TEXT
        fp["ppl_dataset"] = file_sha256(text) if text.is_file() else str(text)
    return fp


def accuracy_checks(config: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """summarize.py's gate (ROUGE-1 strictly above the threshold; perplexity strictly below), plus the gap to
    transformers. Judged on every run, computed or reused, from the artifact's metrics: thresholds are not part of
    the cache key, so changing one never re-runs the evaluation."""
    ev = config["evaluate"]
    if not ev["check_accuracy"]:
        return {}
    checks: dict[str, Any] = {"n": metrics["n"], "failed": []}
    if "engine_rouge1" in metrics:
        checks["rouge1_threshold"] = ev["tensorrt_llm_rouge1_threshold"]
        if not metrics["engine_rouge1"] > ev["tensorrt_llm_rouge1_threshold"]:
            checks["failed"].append(f"engine ROUGE-1 {metrics['engine_rouge1']:.2f} is not above the threshold "
                                    f"{ev['tensorrt_llm_rouge1_threshold']} (n={metrics['n']})")
        if "hf_rouge1" in metrics:
            floor = metrics["hf_rouge1"] - ev["hf_rouge1_tolerance"]
            checks["hf_rouge1_floor"] = round(floor, 4)
            if metrics["engine_rouge1"] < floor:
                checks["failed"].append(f"engine ROUGE-1 {metrics['engine_rouge1']:.2f} is more than "
                                        f"{ev['hf_rouge1_tolerance']} below transformers' {metrics['hf_rouge1']:.2f} "
                                        f"(n={metrics['n']})")
    if "engine_ppl" in metrics and ev["tensorrt_llm_ppl_threshold"] is not None:
        checks["ppl_threshold"] = ev["tensorrt_llm_ppl_threshold"]
        if not metrics["engine_ppl"] < ev["tensorrt_llm_ppl_threshold"]:
            checks["failed"].append(f"engine perplexity {metrics['engine_ppl']:.3f} is not below "
                                    f"{ev['tensorrt_llm_ppl_threshold']}")
    return checks


THRESHOLD_KEYS = ("evaluate.check_accuracy", "evaluate.tensorrt_llm_rouge1_threshold", "evaluate.hf_rouge1_tolerance",
                  "evaluate.tensorrt_llm_ppl_threshold")


def evaluate_preflight(config: dict[str, Any], facts: dict[str, Any]) -> None:
    """The datasets exist, have rows and the named fields, before any stage starts."""
    ev = config["evaluate"]
    if ev["task"] == "summarize":
        load_samples(ev["dataset"], ev["input_field"], ev["reference_field"], ev["dataset_split"],
                     ev.get("dataset_config"))
    if ev["task"] == "ppl" or ev["eval_ppl"]:
        load_text(ev["ppl_dataset"])


@stage("evaluate", version=STAGE_VERSION, reads=("evaluate", "model", "dtype"), needs=("build",),
       fingerprint=evaluate_fingerprint, unkeyed=("model.path", "model.package", *THRESHOLD_KEYS),
       checks=accuracy_checks, preflight=evaluate_preflight)
def evaluate_stage(ctx: StageContext) -> dict[str, Any]:
    ev, engine_dir = ctx.config["evaluate"], ctx.inputs["build"]
    tokenizer = _tokenizer(engine_dir)
    limits = json.loads((engine_dir / "config.json").read_text())["build_config"]
    samples, request = _request(ev, tokenizer, engine_dir, limits)
    engine = _run_engine(engine_dir, request)
    report: dict[str, Any] = {
        "task": ev["task"], "n": len(samples),
        "dataset": {"name": ev["dataset"] or "shipped:summarize_small", "split": ev["dataset_split"],
                    "input_field": ev["input_field"], "reference_field": ev["reference_field"],
                    "fingerprint": dataset_fingerprint(ev["dataset"], ev["dataset_split"]) if samples else None},
        "prompt": {"template": ev["prompt_template"], "system_prompt": ev["system_prompt"],
                   "max_input_length": ev["max_input_length"], "truncation": "left"},
        "generation": {k: request[k] for k in ("max_new_tokens", "end_id", "pad_id", "temperature", "top_k", "top_p",
                                                "num_beams", "random_seed", "batch_size")},
        "engine_key": engine_dir.name,
        "versions": library_versions(),
    }
    texts = {"engine": [tokenizer.decode(o, skip_special_tokens=True) for o in engine["outputs"]]}
    report["engine"] = _section(engine, texts["engine"], samples, ev)
    if ev["test_hf"]:
        hf = _run_hf(ctx.config, request)
        texts["hf"] = [tokenizer.decode(o, skip_special_tokens=True) for o in hf["outputs"]]
        report["hf"] = _section(hf, texts["hf"], samples, ev)
        if samples:
            report["agreement"] = {
                "identical_fraction": sum(a == b for a, b in zip(engine["outputs"], hf["outputs"])) / len(samples),
                **{f"{k}_engine_vs_hf": v for k, v in rouge(texts["engine"], texts["hf"], ev["use_stemmer"]).items()},
            }
    validate(report, "report", what="evaluation report.json")
    (ctx.out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _write_outputs(ctx.out_dir / "outputs.jsonl", samples, request["prompts"], texts)
    return _headline(report)


def _tokenizer(engine_dir: Path):
    from transformers import AutoTokenizer

    path = engine_dir / "tokenizer"
    if not path.is_dir():
        raise PipelineError(f"evaluation needs a tokenizer and {path} is missing: the source model carried none")
    return AutoTokenizer.from_pretrained(path)


def _request(ev: dict[str, Any], tokenizer, engine_dir: Path, limits: dict[str, Any]):
    max_input = min(ev["max_input_length"], limits["max_input_len"], limits["max_seq_len"] - ev["output_len"])
    if max_input < 1:
        raise PipelineError(f"evaluate.output_len={ev['output_len']} leaves no room for a prompt in the engine's "
                            f"max_seq_len={limits['max_seq_len']}")
    if ev["batch_size"] > limits["max_batch_size"]:
        raise PipelineError(f"evaluate.batch_size={ev['batch_size']} exceeds the engine's max_batch_size={limits['max_batch_size']}")
    samples = []
    if ev["task"] == "summarize":
        samples = load_samples(ev["dataset"], ev["input_field"], ev["reference_field"], ev["dataset_split"],
                               ev["dataset_config"], ev["random_seed"] if ev["shuffle"] else None)
        samples = samples[: ev["max_ite"] * ev["batch_size"]]
    ppl_windows = []
    if ev["task"] == "ppl" or ev["eval_ppl"]:
        if not limits["gather_context_logits"]:
            raise PipelineError("perplexity needs the engine's context logits: set build.gather_context_logits=true")
        ids = tokenizer.encode(load_text(ev["ppl_dataset"]))
        ppl_windows = windows(ids, min(ev["ppl_window"], limits["max_input_len"]), ev["ppl_max_windows"])
    end_id = tokenizer.eos_token_id
    request = {
        "engine_dir": str(engine_dir),
        "prompts": [encode_prompt(tokenizer, s.input, ev["prompt_template"], ev["system_prompt"], max_input)
                    for s in samples],
        "ppl_windows": ppl_windows,
        "batch_size": ev["batch_size"], "max_new_tokens": ev["output_len"], "end_id": end_id,
        "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id,
        "temperature": ev["temperature"], "top_k": ev["top_k"], "top_p": ev["top_p"], "num_beams": ev["num_beams"],
        "random_seed": ev["random_seed"],
    }
    return samples, request


def _run_engine(engine_dir: Path, request: dict[str, Any]) -> dict[str, Any]:
    from pipeline.runtime.launch import engine_world_size, run_module_on_ranks

    world = engine_world_size(engine_dir)
    if world == 1:
        from pipeline.runtime import ModelRunner

        return run_engine_eval(ModelRunner.from_dir(engine_dir), request)
    with tempfile.TemporaryDirectory() as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        run_module_on_ranks(world, "pipeline.evaluate.engine_eval", [str(req), str(res)])
        return json.loads(res.read_text())


def _run_hf(config: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    from pipeline.convert.sources import open_source
    from pipeline.convert.sources.locate import resolve_model_path
    from pipeline.evaluate.hf_eval import run_hf_eval

    model_cfg = config["model"]
    dtype = getattr(torch, config["evaluate"]["data_type"] or config["dtype"])
    source = open_source(model_cfg["source"], resolve_model_path(model_cfg["path"], model_cfg["package"]))
    try:
        model = source.transformers_model(dtype)
    finally:
        source.close()
    return run_hf_eval(model, request)


def _section(result: dict[str, Any], texts: list[str], samples, ev) -> dict[str, Any]:
    section: dict[str, Any] = {}
    if samples:
        section.update(rouge(texts, [s.reference for s in samples], ev["use_stemmer"]))
    if result["ppl_tokens"]:
        section["ppl"] = round(perplexity(result["ppl_nll"], result["ppl_tokens"]), 6)
        section["ppl_tokens"] = result["ppl_tokens"]
    section["generated_tokens"] = result["generated_tokens"]
    section["seconds"] = round(result["seconds"], 3)
    section["tokens_per_second"] = round(result["generated_tokens"] / result["seconds"], 2) if result["seconds"] else None
    if result.get("ttft_seconds"):
        section["ttft_seconds"] = round(sum(result["ttft_seconds"]) / len(result["ttft_seconds"]), 4)
    return section


def _write_outputs(path: Path, samples, prompts, texts: dict[str, list[str]]) -> None:
    with open(path, "w") as f:
        for i, s in enumerate(samples):
            row = {"id": s.id, "prompt_tokens": len(prompts[i]), "engine": texts["engine"][i], "reference": s.reference,
                   "rouge_engine": rouge_per_sample([texts["engine"][i]], [s.reference])[0]}
            if "hf" in texts:
                row["hf"] = texts["hf"][i]
                row["rouge_hf"] = rouge_per_sample([texts["hf"][i]], [s.reference])[0]
            f.write(json.dumps(row) + "\n")


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    metrics: dict[str, Any] = {"n": report["n"]}
    for side in ("engine", "hf"):
        for key in (*ROUGE_TYPES, "ppl", "tokens_per_second", "ttft_seconds"):
            if key in report.get(side, {}):
                metrics[f"{side}_{key}"] = report[side][key]
    if "agreement" in report:
        metrics["identical_fraction"] = report["agreement"]["identical_fraction"]
    return metrics
