"""build.backend=onnx: the runtime's modules exported per rank, run by onnxruntime behind ModelRunner, against the cpu
backend on the same checkpoint (prefill and decode over a ragged batch: logits within 1e-4 in float32, identical
greedy tokens over 16 steps); the graphs' checks, census and profiles; refusals; cache key; pipeline and tensor
parallelism under mpirun.

Exporting costs seconds per graph, so CI runs a set of architectures covering every structural variant of the
runtime (GQA, both RoPE styles and partial rotary, learned positions, LayerNorm and RMSNorm, sequential, parallel and
sandwich residuals, soft-caps, sliding windows, MoE); TRTLLM_PIPELINE_ALL_ARCHS=1 runs every tiny architecture."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'trtllm-pipeline[onnx]'")

from pipeline.engine.backends import get_backend  # noqa: E402
from pipeline.engine.onnx_backend import checkpoint_refusals  # noqa: E402
from pipeline.engine.onnx_export import FORBIDDEN_OPS, profiles  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.runtime import ModelRunner  # noqa: E402
from pipeline.stages.build import backend_environment  # noqa: E402
from tests.conftest import TINY_MODELS, make_tiny_model, needs_mpirun  # noqa: E402
from tests.engine.checkpoints import BUILD, make_checkpoint  # noqa: E402

PROMPTS = [[5, 17, 3, 9, 22, 41, 7], [11, 2], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 12], [8, 8, 8, 1]]
CI_ARCHS = ["llama_gqa_untied", "gpt2", "gptj", "gemma2_softcap", "mixtral_4e_top2"]
ARCHS = list(TINY_MODELS) if os.environ.get("TRTLLM_PIPELINE_ALL_ARCHS") else CI_ARCHS


def generate(engine, n=16):
    runner = ModelRunner.from_dir(engine, kernel="torch") if "cpu" in engine.name else ModelRunner.from_dir(engine)
    return runner.generate([torch.tensor(p) for p in PROMPTS], max_new_tokens=n, end_id=-1, pad_id=0,
                           return_dict=True, output_generation_logits=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_engine_matches_the_cpu_engine(exported, arch):
    built = exported(arch)
    cpu, onnx, metrics = built["cpu"], built["onnx"], built["metrics"]
    want, got = generate(cpu), generate(onnx)
    for i, p in enumerate(PROMPTS):  # prefill: every position of every (ragged) sequence
        assert (got["context_logits"][i, : len(p)] - want["context_logits"][i, : len(p)]).abs().max() < 1e-4, i
    assert (got["generation_logits"] - want["generation_logits"]).abs().max() < 1e-4  # decode steps
    assert torch.equal(got["output_ids"], want["output_ids"]) and torch.equal(got["sequence_lengths"],
                                                                              want["sequence_lengths"])
    census = metrics["onnx_op_census"]
    assert census["TensorScatter"] == 2 * TINY_MODELS[arch][1].get("num_hidden_layers",
                                                                  TINY_MODELS[arch][1].get("n_layer"))
    assert not set(census) & FORBIDDEN_OPS
    assert sorted(p.name for p in onnx.glob("rank*.onnx")) == ["rank0.logits.onnx", "rank0.step.onnx"]
    config = json.loads((onnx / "config.json").read_text())
    assert config["engine"]["backend"] == "onnx"


def test_evaluate_runs_onnx_engines_like_cpu_engines(exported):
    from pipeline.evaluate.engine_eval import run_engine_eval

    built = exported("llama_gqa_untied")
    request = {"prompts": PROMPTS, "batch_size": 3, "max_new_tokens": 6, "end_id": -1, "pad_id": 0,
               "temperature": 1.0, "top_k": 1, "top_p": 0.0, "num_beams": 1, "random_seed": 0,
               "ppl_windows": [PROMPTS[2]]}
    want = run_engine_eval(ModelRunner.from_dir(built["cpu"], kernel="torch"), request)
    got = run_engine_eval(ModelRunner.from_dir(built["onnx"]), request)
    assert got["outputs"] == want["outputs"] and abs(got["ppl_nll"] - want["ppl_nll"]) < 1e-3


def test_profiles_follow_the_build_limits():
    limits = {"max_batch_size": 8, "max_input_len": 512, "max_seq_len": 1024, "max_num_tokens": 256}
    assert profiles(limits) == {"context": {"batch": (1, 8, 8), "seq": (1, 32, 512)},
                                "generation": {"batch": (1, 8, 8), "seq": (1, 1, 1)}}


def test_refusals_name_what_the_export_does_not_cover():
    base = {"dtype": "float32", "mapping": {"tp_size": 1}}
    assert checkpoint_refusals(base) == []
    quant = checkpoint_refusals({**base, "quantization": {"quant_algo": "W8A16", "kv_cache_quant_algo": "INT8"}})
    assert "quant_algo=W8A16" in quant[0] and "kv_cache_quant_algo=INT8" in quant[1]
    assert "dtype=bfloat16" in checkpoint_refusals({**base, "dtype": "bfloat16"})[0]
    assert checkpoint_refusals({**base, "mapping": {"tp_size": 2, "pp_size": 2}}) == []


def test_refused_checkpoint_leaves_no_engine(tmp_path):
    ckpt = make_checkpoint(make_tiny_model(tmp_path, "llama_mha_tied"), tmp_path / "ckpt", dtype="bfloat16")
    with pytest.raises(PipelineError, match=r"build.backend=onnx cannot export.*dtype=bfloat16"):
        get_backend("onnx").build(ckpt, tmp_path / "engine", {**BUILD, "backend": "onnx"})
    assert not (tmp_path / "engine").exists()


def test_exporter_versions_are_part_of_the_cache_key():
    env = backend_environment({"build": {**BUILD, "backend": "onnx"}})
    assert set(env) == {"torch", "onnx", "onnxscript", "onnxruntime"}
    assert backend_environment({"build": BUILD}) is None


@needs_mpirun
def test_pipeline_parallel_onnx_engine_under_mpirun_equals_single_rank(exported, tmp_path):
    from tests.runtime.test_multirank import PROMPTS as MPI_PROMPTS, generate_on_ranks

    single_rank = exported("llama_gqa_untied")
    ckpt = make_checkpoint(single_rank["ckpt"].parent / "llama_gqa_untied", tmp_path / "ckpt", pp=2)
    engine = tmp_path / "onnx_pp2"
    get_backend("onnx").build(ckpt, engine, {**BUILD, "backend": "onnx"})
    assert sorted(p.name for p in engine.glob("rank*.onnx")) == ["rank0.step.onnx", "rank1.logits.onnx",
                                                                  "rank1.step.onnx"]
    single = generate_on_ranks(single_rank["onnx"], tmp_path / "out1", 1)[0]
    for result in generate_on_ranks(engine, tmp_path / "out2", 2):
        assert torch.equal(result["output_ids"], single["output_ids"]), MPI_PROMPTS
        assert (result["generation_logits"] - single["generation_logits"]).abs().max() < 1e-5


@needs_mpirun
@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)] if os.environ.get("TRTLLM_PIPELINE_ALL_ARCHS") else [(2, 1)])
def test_tensor_parallel_onnx_engine_under_mpirun(exported, tmp_path, tp, pp):
    """Each tp rank's graphs are cut at the all-reduce / all-gather points into segments; the runtime performs the
    collectives between them. Equal to the cpu backend's engine of the same mapping and to single rank."""
    from tests.runtime.test_multirank import generate_on_ranks

    single_rank = exported("llama_gqa_untied")
    built = exported("llama_gqa_untied", tp, pp)
    engine, metrics = built["onnx"], built["metrics"]
    layers = TINY_MODELS["llama_gqa_untied"][1]["num_hidden_layers"]
    assert metrics["onnx_op_census"]["AllReduce"] == 2 * layers * tp  # attention output and MLP down, every rank
    graphs = json.loads((engine / "graphs.json").read_text())
    for entry in graphs["ranks"]:
        step = entry["segments"]["step"]
        assert [s["collective"] for s in step if "collective" in s] == ["all_reduce"] * 2 * len(entry["model"]["layers"])
        assert not any(i["dtype"] == "int64" and all(isinstance(n, int) for n in i["shape"])
                       for s in step if "segment" in s for i in s["inputs"])  # shape tensors are recomputed
        if "logits" in entry["segments"]:
            assert [s["collective"] for s in entry["segments"]["logits"] if "collective" in s] == ["all_gather"]
    assert not list(engine.glob("rank*.step.onnx"))  # only the segments remain
    single = generate_on_ranks(single_rank["onnx"], tmp_path / "out1", 1)[0]
    cpu = generate_on_ranks(built["cpu"], tmp_path / "out_cpu", tp * pp, "torch")
    for rank, result in enumerate(generate_on_ranks(engine, tmp_path / "out", tp * pp)):
        assert torch.equal(result["output_ids"], single["output_ids"]), rank
        assert torch.equal(result["output_ids"], cpu[rank]["output_ids"]), rank
        for key in ("context_logits", "generation_logits"):
            assert (result[key] - single[key]).abs().max() < 1e-4, (rank, key)
            assert (result[key] - cpu[rank][key]).abs().max() < 1e-4, (rank, key)
