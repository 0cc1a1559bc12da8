"""The evaluate stage: run the engine (on all its ranks) over a dataset; ROUGE, perplexity and speed; optionally the
same through transformers; a report validated by its schema; accuracy checks that fail the run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.evaluate.data import dataset_fingerprint, load_samples, load_text
from pipeline.evaluate.ppl import perplexity
from pipeline.evaluate.request import build_request, evaluate_fingerprint, has_ppl_windows
from pipeline.evaluate.stats import verdict
from pipeline.executor import StageContext, library_versions, stage
from pipeline.schemas import validate
from pipeline.stages.reference import kl_reference_file, load_reference, wants_reference

# The engine runtime, torch, ROUGE and numpy are imported by the functions that evaluate: the key functions and
# the accuracy checks a cached run applies import none of them.
STAGE_VERSION = 4  # 2: transformers' side comes from the reference stage; paired ROUGE-1 interval; KL divergence
# 3: decode speed probe at batch 1 and the engine's max batch; 4: the report counts truncated prompts


def accuracy_checks(config: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The accuracy gate, judged on every run, computed or reused, from the artifact's metrics: gate keys are not
    part of the cache key, so changing one never re-runs the evaluation. With `gate=threshold`, summarize.py's
    (ROUGE-1 strictly above the threshold; perplexity strictly below) plus the gap to transformers; with
    `gate=statistical`, the paired interval, KL divergence and top-1 agreement against the reference."""
    ev = config["evaluate"]
    checks: dict[str, Any] = {}
    if "rouge1_vs_hf" in metrics:  # a verdict is information on every run; only check_accuracy makes it a gate
        checks["rouge1_vs_hf"] = verdict(metrics["rouge1_vs_hf"], ev["max_rouge1_drop"])
    if not ev["check_accuracy"]:
        return {"verdicts": checks} if checks else {}
    checks = {"n": metrics["n"], "gate": ev["gate"], "failed": [], **({"verdicts": checks} if checks else {})}
    judge = statistical_gate if ev["gate"] == "statistical" else threshold_gate
    judge(ev, metrics, checks)
    return checks


def threshold_gate(ev: dict[str, Any], metrics: dict[str, Any], checks: dict[str, Any]) -> None:
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


def statistical_gate(ev: dict[str, Any], metrics: dict[str, Any], checks: dict[str, Any]) -> None:
    judged = False
    if "rouge1_vs_hf" in metrics:
        judged, diff, drop = True, metrics["rouge1_vs_hf"], ev["max_rouge1_drop"]
        checks["max_rouge1_drop"] = drop
        if diff["ci_low"] < -drop:
            checks["failed"].append(
                f"engine ROUGE-1 minus transformers' is {diff['mean']:+.2f} with 95% interval "
                f"[{diff['ci_low']:+.2f}, {diff['ci_high']:+.2f}], reaching below -{drop:g} (n={diff['n']}: "
                f"{checks['verdicts']['rouge1_vs_hf']})")
    if ev["max_mean_kld"] is not None:
        judged = _limit(metrics, checks, "kld_mean", ev["max_mean_kld"], above=True) or judged
    if ev["min_top1_agreement"] is not None:
        judged = _limit(metrics, checks, "top1_agreement", ev["min_top1_agreement"], above=False) or judged
    if not judged:
        checks["failed"].append("the statistical gate has nothing to judge: it needs evaluate.test_hf=true (the "
                                "reference) and, for KL divergence, perplexity windows (evaluate.eval_ppl=true)")


def _limit(metrics: dict[str, Any], checks: dict[str, Any], key: str, limit: float, above: bool) -> bool:
    name = {"kld_mean": "max_mean_kld", "top1_agreement": "min_top1_agreement"}[key]
    checks[name] = limit
    if key not in metrics:
        checks["failed"].append(f"evaluate.{name} is set but there is no {key}: it needs evaluate.test_hf=true, "
                                "evaluate.eval_ppl=true and build.gather_context_logits=true")
        return True
    value = metrics[key]
    if (value > limit) if above else (value < limit):
        checks["failed"].append(f"{key} {value:.4g} is {'above' if above else 'below'} evaluate.{name}={limit:g} "
                                f"over {metrics.get('kld_tokens')} tokens")
    return True


THRESHOLD_KEYS = ("evaluate.check_accuracy", "evaluate.tensorrt_llm_rouge1_threshold", "evaluate.hf_rouge1_tolerance",
                  "evaluate.tensorrt_llm_ppl_threshold", "evaluate.gate", "evaluate.max_rouge1_drop",
                  "evaluate.max_mean_kld", "evaluate.min_top1_agreement", "evaluate.reference_batch_size")


def evaluate_preflight(config: dict[str, Any], facts: dict[str, Any]) -> None:
    """The datasets exist, have rows and the named fields, before any stage starts."""
    ev = config["evaluate"]
    if ev["task"] == "summarize":
        load_samples(ev["dataset"], ev["input_field"], ev["reference_field"], ev["dataset_split"],
                     ev.get("dataset_config"))
    if has_ppl_windows(ev):
        load_text(ev["ppl_dataset"])


@stage("evaluate", version=STAGE_VERSION, reads=("evaluate", "model", "dtype"), needs=("build",),
       fingerprint=evaluate_fingerprint, unkeyed=("model.path", "model.package", *THRESHOLD_KEYS),
       checks=accuracy_checks, optional_needs=(("reference", wants_reference),), preflight=evaluate_preflight)
def evaluate_stage(ctx: StageContext) -> dict[str, Any]:
    from pipeline.evaluate.rouge import rouge, rouge_per_sample
    from pipeline.evaluate.stats import kld_summary, paired_bootstrap

    ev, engine_dir = ctx.config["evaluate"], ctx.inputs["build"]
    tokenizer = _tokenizer(engine_dir)
    limits = json.loads((engine_dir / "config.json").read_text())["build_config"]
    samples, request = _request(ev, tokenizer, engine_dir, limits)
    reference = _reference(ctx.inputs.get("reference"), request)
    stored = kl_reference_file(ctx.inputs["reference"]) if reference is not None and request["ppl_windows"] else None
    if stored is not None:
        request["kl_reference"] = {"form": stored[0], "path": str(stored[1])}
    request["progress"] = ctx.progress
    request["speed_steps"], request["speed_prompt_len"] = ev["speed_steps"], ev["speed_prompt_len"]
    engine = _run_engine(engine_dir, request)
    report: dict[str, Any] = {
        "task": ev["task"], "n": len(samples),
        "dataset": {"name": ev["dataset"] or "shipped:summarize_small", "split": ev["dataset_split"],
                    "input_field": ev["input_field"], "reference_field": ev["reference_field"],
                    "fingerprint": dataset_fingerprint(ev["dataset"], ev["dataset_split"]) if samples else None},
        "prompt": {"template": ev["prompt_template"], "system_prompt": ev["system_prompt"],
                   "max_input_length": ev["max_input_length"], "truncation": "left",
                   "max_prompt_tokens": request["max_prompt_tokens"], "truncated_samples": request["truncated_samples"]},
        "generation": {k: request[k] for k in ("max_new_tokens", "end_id", "pad_id", "temperature", "top_k", "top_p",
                                                "num_beams", "length_penalty", "early_stopping", "random_seed",
                                                "batch_size")},
        "engine_key": engine_dir.name,
        "versions": library_versions(),
    }
    texts = {"engine": [tokenizer.decode(o, skip_special_tokens=True) for o in engine["outputs"]]}
    report["engine"] = _section(engine, texts["engine"], samples, ev)
    if engine.get("speed"):
        report["speed"] = engine["speed"]
    if reference is not None:
        report["reference_key"] = ctx.inputs["reference"].name
        texts["hf"] = reference["texts"]
        report["hf"] = _section(reference, texts["hf"], samples, ev)
        report["hf"]["batch_size"] = reference["batch_size"]
        if samples:
            report["agreement"] = {
                "identical_fraction": sum(a == b for a, b in zip(engine["outputs"], reference["outputs"])) / len(samples),
                **{f"{k}_engine_vs_hf": v for k, v in rouge(texts["engine"], texts["hf"], ev["use_stemmer"]).items()},
            }
            engine_r1 = [r["rouge1"] for r in rouge_per_sample(texts["engine"], [s.reference for s in samples], ev["use_stemmer"])]
            report["rouge1_vs_hf"] = paired_bootstrap(engine_r1, [r["rouge1"] for r in reference["rouge_per_sample"]])
        if "kl" in engine and engine["kl"]:
            report["kld"] = {**kld_summary(engine["kl"], engine["top1"], report["engine"].get("ppl"),
                                           report["hf"].get("ppl")), "kld_reference": engine["kl_form"]}
    validate(report, "report", what="evaluation report.json")
    (ctx.out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _write_outputs(ctx.out_dir / "outputs.jsonl", samples, request["prompts"], texts)
    return _headline(report)


def _reference(artifact: Path | None, request: dict[str, Any]) -> dict[str, Any] | None:
    """The cached transformers run for these prompts; it must have seen exactly the prompts and windows the engine
    sees (the reference truncates with the recipe's build limits, the engine with its own)."""
    if artifact is None:
        return None
    reference = load_reference(artifact)
    if reference["prompts"] != request["prompts"] or reference["ppl_windows"] != request["ppl_windows"]:
        raise PipelineError(f"the reference {artifact} was computed for other prompts or perplexity windows than "
                            "this engine's limits give; set build.max_seq_len explicitly so both truncate alike")
    return reference


def _tokenizer(engine_dir: Path):
    from transformers import AutoTokenizer

    path = engine_dir / "tokenizer"
    if not path.is_dir():
        raise PipelineError(f"evaluation needs a tokenizer and {path} is missing: the source model carried none")
    return AutoTokenizer.from_pretrained(path)


def _request(ev: dict[str, Any], tokenizer, engine_dir: Path, limits: dict[str, Any]):
    if ev["num_beams"] > limits["max_beam_width"]:
        raise PipelineError(f"evaluate.num_beams={ev['num_beams']} exceeds the engine's max_beam_width="
                            f"{limits['max_beam_width']}: build it with build.max_beam_width={ev['num_beams']}")
    if ev["batch_size"] > limits["max_batch_size"]:
        raise PipelineError(f"evaluate.batch_size={ev['batch_size']} exceeds the engine's max_batch_size={limits['max_batch_size']}")
    if has_ppl_windows(ev) and not limits["gather_context_logits"]:
        raise PipelineError("perplexity needs the engine's context logits: set build.gather_context_logits=true")
    samples, request = build_request(ev, tokenizer, limits["max_input_len"], limits["max_seq_len"])
    return samples, {"engine_dir": str(engine_dir), **request}


def _run_engine(engine_dir: Path, request: dict[str, Any]) -> dict[str, Any]:
    from pipeline.runtime.launch import engine_world_size, run_module_on_ranks

    world = engine_world_size(engine_dir)
    if world == 1:
        from pipeline.evaluate.engine_eval import run_engine_eval
        from pipeline.runtime import ModelRunner

        return run_engine_eval(ModelRunner.from_dir(engine_dir), request)
    with tempfile.TemporaryDirectory() as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        run_module_on_ranks(world, "pipeline.evaluate.engine_eval", [str(req), str(res)])
        return json.loads(res.read_text())


def _section(result: dict[str, Any], texts: list[str], samples, ev) -> dict[str, Any]:
    from pipeline.evaluate.rouge import rouge_with_intervals

    section: dict[str, Any] = {}
    if samples:
        mid, intervals = rouge_with_intervals(texts, [s.reference for s in samples], ev["use_stemmer"])
        section.update(mid)
        section["rouge_ci"] = intervals
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
    from pipeline.evaluate.rouge import rouge_per_sample

    with open(path, "w") as f:
        for i, s in enumerate(samples):
            row = {"id": s.id, "prompt_tokens": len(prompts[i]), "engine": texts["engine"][i], "reference": s.reference,
                   "rouge_engine": rouge_per_sample([texts["engine"][i]], [s.reference])[0]}
            if "hf" in texts:
                row["hf"] = texts["hf"][i]
                row["rouge_hf"] = rouge_per_sample([texts["hf"][i]], [s.reference])[0]
            f.write(json.dumps(row) + "\n")


def speed_metrics(speed: dict[str, Any] | None) -> dict[str, Any]:
    """The speed probe's figures as flat metrics (what run.json and the sweep report carry)."""
    if not speed:
        return {}
    batch_n = speed.get("batch_n", speed["batch_1"])  # an engine of max_batch_size 1: batch N is batch 1
    return {"decode_max_batch": speed["max_batch_size"],
            "decode_tps_batch_1": speed["batch_1"]["decode_tokens_per_second"],
            "decode_tps_batch_n": batch_n["decode_tokens_per_second"],
            "ttft_batch_1_seconds": speed["batch_1"]["ttft_seconds"],
            "ttft_batch_n_seconds": batch_n["ttft_seconds"]}


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    from pipeline.evaluate.rouge import ROUGE_TYPES

    metrics: dict[str, Any] = {"n": report["n"], "truncated_samples": report["prompt"]["truncated_samples"]}
    for side in ("engine", "hf"):
        for key in (*ROUGE_TYPES, "ppl", "tokens_per_second", "ttft_seconds"):
            if key in report.get(side, {}):
                metrics[f"{side}_{key}"] = report[side][key]
    if "agreement" in report:
        metrics["identical_fraction"] = report["agreement"]["identical_fraction"]
    if "rouge1_vs_hf" in report:
        metrics["rouge1_vs_hf"] = report["rouge1_vs_hf"]
    metrics.update(report.get("kld", {}))
    metrics.update(speed_metrics(report.get("speed")))
    if "engine" in report:
        metrics["engine_generated_tokens"] = report["engine"]["generated_tokens"]
        metrics["engine_seconds"] = report["engine"]["seconds"]
    return metrics
