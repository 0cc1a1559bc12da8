"""build.backend=trtllm against a fake trtllm-build on PATH and a fake tensorrt_llm.runtime: the flags, the log, the
cache key, the errors, and the evaluate wiring (in-process and under mpirun)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.engine.backends import get_backend
from pipeline.errors import PipelineError
from pipeline.stages.build import backend_environment
from tests.conftest import make_tiny_model, needs_mpirun
from tests.engine.checkpoints import BUILD, make_checkpoint
from tests.engine.fake_trtllm import activate, install_fake_trtllm, set_fake_version


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("trtllm")
    model = make_tiny_model(root, "llama_gqa_untied")
    return {1: make_checkpoint(model, root / "tp1"), 2: make_checkpoint(model, root / "tp2", tp=2)}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    root = install_fake_trtllm(tmp_path / "fake")
    activate(monkeypatch, root)
    return root


def _calls(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_limits_map_to_trtllm_build_flags_and_log_is_kept(checkpoints, fake, tmp_path):
    engine = tmp_path / "engine"
    build = {**BUILD, "backend": "trtllm", "max_batch_size": 3, "max_num_tokens": 40, "gather_generation_logits": False,
             "trtllm_args": ["--gemm_plugin", "float16", "--use_paged_context_fmha", "enable"]}
    metrics = get_backend("trtllm").build(checkpoints[2], engine, build)
    argv = _calls(fake / "build_calls.jsonl")[0]["argv"]
    flags = {argv[i]: argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True
             for i in range(len(argv)) if argv[i].startswith("--")}
    assert flags["--checkpoint_dir"] == str(checkpoints[2])
    assert flags["--output_dir"] == str(engine / "trtllm")
    assert (flags["--max_batch_size"], flags["--max_input_len"], flags["--max_seq_len"]) == ("3", "32", "64")
    assert (flags["--max_num_tokens"], flags["--max_beam_width"], flags["--workers"]) == ("40", "1", "2")
    assert flags["--gather_context_logits"] is True and "--gather_generation_logits" not in flags
    assert flags["--gemm_plugin"] == "float16" and argv.count("--gemm_plugin") == 1  # the user's flag replaces ours
    assert flags["--use_paged_context_fmha"] == "enable"  # passed through
    assert "fake trtllm-build: building" in (engine / "trtllm-build.log").read_text()
    config = json.loads((engine / "config.json").read_text())
    assert config["engine"]["backend"] == "trtllm" and config["build_config"]["max_batch_size"] == 3
    assert metrics["tensorrt_llm_version"] == "0.17.0"


def test_version_is_part_of_the_cache_key(checkpoints, fake):
    stage_config = {"build": {**BUILD, "backend": "trtllm"}}
    before = backend_environment(stage_config)
    set_fake_version(fake, "1.0.0")
    assert backend_environment(stage_config) != before == {"tensorrt_llm": "0.17.0"}
    assert backend_environment({"build": BUILD}) is None  # cpu keys are unchanged


def test_build_failure_names_the_log(checkpoints, fake, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TRTLLM_FAIL", "1")
    with pytest.raises(PipelineError, match=r"trtllm-build failed with exit code 3 .*trtllm-build.log.*out of memory"):
        get_backend("trtllm").build(checkpoints[1], tmp_path / "engine", {**BUILD, "backend": "trtllm"})


def test_missing_tensorrt_llm_names_what_to_install(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no trtllm-build anywhere
    with pytest.raises(PipelineError, match=r"pip install 'tensorrt-llm<2'"):
        get_backend("trtllm").build(checkpoints[1], tmp_path / "engine", {**BUILD, "backend": "trtllm"})
    with pytest.raises(PipelineError, match=r"TensorRT-LLM is not installed"):
        backend_environment({"build": {**BUILD, "backend": "trtllm"}})


def test_model_runner_runs_trtllm_engines_through_tensorrt_llm(checkpoints, fake, tmp_path):
    from pipeline.evaluate.engine_eval import run_engine_eval
    from pipeline.runtime import ModelRunner

    engine = tmp_path / "engine"
    get_backend("trtllm").build(checkpoints[1], engine, {**BUILD, "backend": "trtllm"})
    runner = ModelRunner.from_dir(engine)
    assert _calls(fake / "run_calls.jsonl") == [{"engine_dir": str(engine / "trtllm"), "rank": 0}]
    out = runner.generate([torch.tensor([3, 4, 5]), torch.tensor([7])], max_new_tokens=2, end_id=-1, pad_id=0,
                          return_dict=True)
    assert out["output_ids"][0, 0].tolist() == [3, 4, 5, 6, 7]
    assert out["output_ids"][1, 0, :3].tolist() == [7, 8, 9] and out["sequence_lengths"][:, 0].tolist() == [5, 3]
    request = {"prompts": [[1, 2]], "batch_size": 1, "max_new_tokens": 3, "end_id": -1, "pad_id": 0,
               "temperature": 1.0, "top_k": 1, "top_p": 0.0, "num_beams": 1, "random_seed": 0}
    assert run_engine_eval(runner, request)["outputs"] == [[3, 4, 5]]


@needs_mpirun
def test_evaluate_runs_multi_rank_trtllm_engines_under_mpirun(checkpoints, fake, tmp_path):
    from pipeline.runtime.launch import run_module_on_ranks

    engine = tmp_path / "engine"
    get_backend("trtllm").build(checkpoints[2], engine, {**BUILD, "backend": "trtllm"})
    request = {"engine_dir": str(engine), "prompts": [[1, 2], [9]], "batch_size": 2, "max_new_tokens": 2,
               "end_id": -1, "pad_id": 0, "temperature": 1.0, "top_k": 1, "top_p": 0.0, "num_beams": 1,
               "random_seed": 0}
    (tmp_path / "req.json").write_text(json.dumps(request))
    run_module_on_ranks(2, "pipeline.evaluate.engine_eval", [str(tmp_path / "req.json"), str(tmp_path / "res.json")])
    assert json.loads((tmp_path / "res.json").read_text())["outputs"] == [[3, 4], [10, 11]]
    calls = sorted(_calls(fake / "run_calls.jsonl"), key=lambda c: c["rank"])
    assert calls == [{"engine_dir": str(engine / "trtllm"), "rank": r} for r in (0, 1)]
