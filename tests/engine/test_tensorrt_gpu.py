"""GPU-gated: real TensorRT engines on a CUDA GPU against the cpu backend. Skipped (with the reason) unless
`import tensorrt` works and torch sees a CUDA device. Run everything GPU-side with one command:

    TRTLLM_PIPELINE_ALL_ARCHS=1 python3 -m pytest -q tests/engine/test_tensorrt_gpu.py
"""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.engine.backends import get_backend
from pipeline.runtime import ModelRunner
from tests.conftest import make_tiny_model
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


@pytest.mark.slow
def test_default_model_end_to_end_with_tensorrt(smollm2_gguf, tmp_path):
    from pipeline.executor import run_pipeline
    from tests.recipes_util import compose_recipe

    overrides = ["progress=false", "evaluate.max_ite=1", "evaluate.batch_size=3", "evaluate.output_len=24",
                 "build.max_input_len=512", "build.max_seq_len=560", "build.backend=tensorrt", "dtype=float16"]
    result = run_pipeline(compose_recipe(overrides), tmp_path, ["evaluate"], progress=False)
    stages = {o.name: o for o in result.stages}
    report = json.loads((stages["evaluate"].artifact / "report.json").read_text())
    assert report["agreement"]["identical_fraction"] >= 2 / 3
    print("tensorrt decode tokens/s:", report["engine"]["tokens_per_second"])
