"""build.backend=tensorrt on a machine without a GPU: profile shapes from the limits, the cache key, refusals; and,
with TensorRT-RTX installed (the `tensorrt-rtx` extra), a STRUCTURAL check: every exported architecture parses with
TensorRT's ONNX parser onto native KV-cache-update and attention layers and builds a plan with both profiles. It
proves the graphs are well-formed for TensorRT, not the numerics (those need a GPU: tests/engine/test_tensorrt_gpu.py).
"""

from __future__ import annotations

import sys
import types

import pytest

from pipeline.engine import tensorrt_backend
from pipeline.engine.tensorrt_backend import build_plans, graph_shapes, segment_shapes
from pipeline.errors import PipelineError
from pipeline.stages.build import backend_environment
from tests.engine.checkpoints import BUILD
from tests.engine.test_onnx_backend import ARCHS


def test_profile_shapes_of_the_step_and_logits_graphs():
    entry = {"model": {"hidden_size": 64, "num_heads": 8, "num_kv_heads": 2, "head_size": 8, "intermediate_size": 96,
                       "vocab_size": 103, "num_layers": 3, "layers": [0, 1, 2], "norm_eps": 1e-5,
                       "hidden_act": "silu", "dtype": "float16", "rotary_dim": 8, "rotary_base": 1e4},
             "inputs": ["x", "positions", "past_key_0", "past_value_0"], "files": {}}
    limits = {"max_batch_size": 4, "max_input_len": 32, "max_seq_len": 64, "max_num_tokens": 64}
    context, generation = graph_shapes(entry, "step", limits)
    assert context["x"] == ((1, 1), (4, 16), (4, 32))
    assert context["past_key_0"] == ((1, 2, 64, 8), (4, 2, 64, 8), (4, 2, 64, 8))  # max_seq_len stays static
    assert generation["positions"] == ((1, 1), (4, 1), (4, 1))
    (logits,) = graph_shapes(entry, "logits", limits)
    assert logits["hidden"] == ((1, 1, 64), (4, 16, 64), (4, 32, 64))
    entry["model"]["layers"] = [2]  # a later pipeline stage takes hidden states
    assert graph_shapes(entry, "step", limits)[0]["x"][2] == (4, 32, 64)


@pytest.fixture
def fake_tensorrt(monkeypatch):
    module = types.ModuleType("tensorrt")
    module.__version__ = "10.16.0.1"
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


def test_cache_key_holds_tensorrt_version_and_compute_capability(fake_tensorrt, monkeypatch):
    monkeypatch.setattr(tensorrt_backend, "local_compute_capability", lambda: "9.0")
    config = {"build": {**BUILD, "backend": "tensorrt"}}
    key = backend_environment(config)
    assert (key["tensorrt"], key["flavour"], key["compute_capability"]) == ("10.16.0.1", "tensorrt", "9.0")
    fake_tensorrt.__version__ = "11.4.0.106"
    assert backend_environment(config) != key
    fake_tensorrt.__version__ = "10.16.0.1"
    monkeypatch.setattr(tensorrt_backend, "local_compute_capability", lambda: "8.9")
    assert backend_environment(config) != key


def test_refusals_name_the_problem(fake_tensorrt, monkeypatch):
    monkeypatch.setattr(tensorrt_backend, "local_compute_capability", lambda: None)
    with pytest.raises(PipelineError, match="no CUDA GPU is visible"):
        backend_environment({"build": {**BUILD, "backend": "tensorrt"}})
    monkeypatch.setattr(tensorrt_backend, "local_compute_capability", lambda: "8.0")
    with pytest.raises(PipelineError, match="tensorrt_compute_capability=9.0 but this machine's GPU is compute "
                                            "capability 8.0"):
        backend_environment({"build": {**BUILD, "backend": "tensorrt", "tensorrt_compute_capability": "9.0"}})
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not installed
    with pytest.raises(PipelineError, match=r"TensorRT is not installed.*pip install tensorrt-cu12"):
        backend_environment({"build": {**BUILD, "backend": "tensorrt"}})


@pytest.mark.parametrize("arch", ARCHS)
def test_structural_tensorrt_rtx_parse_and_build(exported, arch):
    """STRUCTURAL check (TensorRT-RTX on the CPU, target SM89): parse + build, not numerics."""
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed: "
                                                     "pip install 'trtllm-pipeline[tensorrt-rtx]'")
    engine = exported(arch)["onnx"]
    manifest = build_plans(engine, trt, "tensorrt-rtx", "8.9")
    step = next(p for p in manifest["plans"] if p["graph"] == "step")
    layers = sum(1 for t in step["io"] if t["name"].startswith("past_key_"))
    assert step["layer_census"]["KV_CACHE_UPDATE"] == 2 * layers
    # soft-capped scores (Gemma2) are computed with plain ops; every other architecture uses fused attention
    assert step["layer_census"].get("ATTENTION_INPUT", 0) == (0 if arch == "gemma2_softcap" else layers)
    assert len(step["profiles"]) == 2 and all(p["plan_bytes"] > 0 for p in manifest["plans"])
    for p in manifest["plans"]:
        (engine / p["plan"]).unlink()


def test_profile_shapes_of_tensor_parallel_segments():
    inputs = [{"name": "x", "dtype": "int64", "shape": ["batch", "seq"]},
              {"name": "past_key_0", "dtype": "float32", "shape": ["batch", 2, 64, 8]},
              {"name": "mask", "dtype": "bool", "shape": ["batch", 1, "seq", 64]},
              {"name": "packed", "dtype": "float32", "shape": ["batch*seq", 64]},
              {"name": "table", "dtype": "float32", "shape": [64, 8]}]
    limits = {"max_batch_size": 4, "max_input_len": 32, "max_seq_len": 64, "max_num_tokens": 64}
    context, generation = segment_shapes(inputs, "step", limits)
    assert context["x"] == ((1, 1), (4, 16), (4, 32)) and generation["x"] == ((1, 1), (4, 1), (4, 1))
    assert context["past_key_0"] == ((1, 2, 64, 8), (4, 2, 64, 8), (4, 2, 64, 8))
    assert context["packed"] == ((1, 64), (64, 64), (128, 64)) and "table" not in context  # static: no profile
    (logits,) = segment_shapes(inputs[:1], "logits", limits)
    assert logits["x"][2] == (4, 32)
    with pytest.raises(PipelineError, match="dimension 'len\\(x\\)'"):
        segment_shapes([{"name": "y", "dtype": "float32", "shape": ["len(x)"]}], "step", limits)


def test_structural_tensorrt_rtx_build_of_tensor_parallel_segments(exported):
    """STRUCTURAL check of a tp2 engine: one plan per segment, every segment parses and builds; the KV-cache updates
    and attentions of each rank's layers are all there."""
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed: "
                                                     "pip install 'trtllm-pipeline[tensorrt-rtx]'")
    engine = exported("llama_gqa_untied", tp=2)["onnx"]
    manifest = build_plans(engine, trt, "tensorrt-rtx", "8.9")
    layers = 3
    for rank in (0, 1):
        plans = [p for p in manifest["plans"] if p["rank"] == rank]
        step = [p for p in plans if p["graph"] == "step"]
        assert [p["position"] for p in step] == list(range(0, 2 * 2 * layers + 1, 2))  # segments between collectives
        assert sum(p["layer_census"].get("KV_CACHE_UPDATE", 0) for p in step) == 2 * layers
        assert sum(p["layer_census"].get("ATTENTION_INPUT", 0) for p in step) == layers
        assert all(len(p["profiles"]) == 2 for p in step) and all(p["plan_bytes"] > 0 for p in plans)
        assert [p["position"] for p in plans if p["graph"] == "logits"] == [0, 2]
    for p in manifest["plans"]:
        (engine / p["plan"]).unlink()
