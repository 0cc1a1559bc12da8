"""NativeKernel's one-call decoder layer (`fused_layer`, native `decoder_layer`) computes the bits its modules
compute, takes exactly the layers it can, and leaves prefill and other layer kinds to the modules."""

from __future__ import annotations

import pytest
import torch

from pipeline.runtime import ModelRunner, native
from pipeline.runtime.kernels import FusedDecoderLayer
from tests.conftest import make_tiny_model
from tests.runtime.engines import build_engine

PROMPTS = [[5, 17, 3, 9, 22, 41, 7], [11, 2, 60], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 12], [8]]


def run_with_and_without_fusion(engine, prompts=PROMPTS, steps=9):
    """(fused layers, the runner's outputs with them, the outputs with every layer computed by its modules)."""
    runner = ModelRunner.from_dir(engine, kernel="auto")
    fused = [layer.fused for layer in runner.model.layers]
    calls = []
    original = FusedDecoderLayer.__call__

    def counted(self, *args):  # so that a test cannot pass by never taking the fused path
        calls.append(1)
        return original(self, *args)

    args = dict(max_new_tokens=steps, end_id=-1, pad_id=0, return_dict=True, output_generation_logits=True)
    FusedDecoderLayer.__call__ = counted
    try:
        with_fusion = runner.generate([torch.tensor(p) for p in prompts], **args)
    finally:
        FusedDecoderLayer.__call__ = original
    assert not any(f is not None for f in fused) or calls
    for layer in runner.model.layers:
        layer.fused = None
    without = runner.generate([torch.tensor(p) for p in prompts], **args)
    return fused, with_fusion, without


def assert_same_outputs(a, b):
    for key in ("output_ids", "context_logits", "generation_logits"):
        assert torch.equal(a[key], b[key]), key


needs_native = pytest.mark.skipif(native.unavailable_reason() is not None,
                                  reason=f"compiled kernels unavailable here: {native.unavailable_reason()}")


@needs_native
@pytest.mark.parametrize("arch", ["llama_gqa_untied", "llama_mha_tied", "qwen2_bias"])  # GQA, MHA, qkv bias
def test_fused_layers_compute_the_modules_bits(tmp_path, arch):
    engine = build_engine(make_tiny_model(tmp_path, arch), tmp_path / "out")
    fused, with_fusion, without = run_with_and_without_fusion(engine)
    assert all(isinstance(f, FusedDecoderLayer) for f in fused)
    assert_same_outputs(with_fusion, without)


@needs_native
@pytest.mark.parametrize("arch", ["gpt2", "gemma", "opt_post_norm", "falcon_mqa_parallel"])
def test_other_layer_kinds_stay_with_their_modules(tmp_path, arch):
    """A plain MLP, gelu, post-norm, parallel attention/MLP: no fused form."""
    engine = build_engine(make_tiny_model(tmp_path, arch), tmp_path / "out")
    runner = ModelRunner.from_dir(engine, kernel="auto")
    assert all(getattr(layer, "fused", None) is None for layer in runner.model.layers)


@needs_native
def test_tensor_parallel_and_16_bit_layers_stay_with_their_modules(tmp_path):
    model = make_tiny_model(tmp_path, "llama_gqa_untied")
    bf16 = ModelRunner.from_dir(build_engine(model, tmp_path / "bf16", dtype="bfloat16"), kernel="auto")
    assert all(layer.fused is None for layer in bf16.model.layers)
    torch_kernel = ModelRunner.from_dir(build_engine(model, tmp_path / "fp32"), kernel="torch")
    assert all(layer.fused is None for layer in torch_kernel.model.layers)
