"""Layer-by-layer calibration on our engine sees the activations transformers computes on the same tokens."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import PipelineError
from pipeline.quantize.stats import unpack_symmetric
from tests.quantize.conftest import CALIBRATION

# TensorRT-LLM module -> the HF modules whose inputs (and outputs) it stands for
INPUTS = {"attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "attention.dense": ("self_attn.o_proj",), "mlp.fc": ("mlp.gate_proj", "mlp.up_proj"),
          "mlp.proj": ("mlp.down_proj",)}


def hf_activations(model_dir, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen = {}

    def hook(name):
        def record(module, args, out):
            seen.setdefault(name, []).append((args[0].reshape(-1, args[0].shape[-1]), out.reshape(-1, out.shape[-1])))
        return record

    for i, layer in enumerate(model.model.layers):
        for mods in INPUTS.values():
            for m in mods:
                layer.get_submodule(m).register_forward_hook(hook(f"{i}.{m}"))
    with torch.no_grad():
        model(tokens)
    return {k: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for k, v in seen.items()}


def test_statistics_match_transformers(quant_model, quant_stats):
    from transformers import AutoTokenizer

    from pipeline.quantize.calibrate import calibration_tokens

    tokens = calibration_tokens(AutoTokenizer.from_pretrained(quant_model), CALIBRATION)
    acts = hf_activations(quant_model, tokens)
    for layer in range(2):
        stats = load_file(str(quant_stats / f"layer_{layer}.safetensors"))
        for key, mods in INPUTS.items():
            x = acts[f"{layer}.{mods[0]}"][0]
            prefix = f"transformer.layers.{layer}.{key}"
            assert torch.allclose(stats[f"{prefix}.absmax"], x.abs().amax(0), rtol=1e-4, atol=1e-5), prefix
            assert torch.allclose(stats[f"{prefix}.absmean"], x.abs().mean(0), rtol=1e-4, atol=1e-5), prefix
            h = (x.double().t() @ x.double()).float()
            hessian = unpack_symmetric(stats[f"{prefix}.hessian"], prefix)
            assert torch.allclose(hessian, h, rtol=1e-3, atol=1e-3 * h.abs().max()), prefix
            out = max(acts[f"{layer}.{m}"][1].abs().max().item() for m in mods)
            assert abs(stats[f"{prefix}.output_absmax"].item() - out) < 1e-4 * out, prefix
        assert stats[f"transformer.layers.{layer}.attention.k_absmax"] > 0


def test_calibration_text_field_is_checked(quant_model, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.quantize.calibrate import calibration_tokens

    with pytest.raises(PipelineError, match="no field 'body'"):
        calibration_tokens(AutoTokenizer.from_pretrained(quant_model), {**CALIBRATION, "text_field": "body"})


@pytest.mark.parametrize("windows", [(4, 64), (2, 8)])
def test_calibration_tokens_are_the_per_text_stream(quant_model, monkeypatch, windows):
    """Tokenized in batches and stopped once the windows are filled: the windows are the first calib_size x
    calib_max_seq_length tokens of the shuffled texts tokenized one at a time and joined by EOS."""
    import random

    from transformers import AutoTokenizer

    from pipeline.quantize import calibrate

    monkeypatch.setattr(calibrate, "TOKENIZE_BATCH", 3)  # several batches, and an early stop at the small window
    tokenizer = AutoTokenizer.from_pretrained(quant_model)
    n, length = windows
    cfg = {**CALIBRATION, "calib_size": n, "calib_max_seq_length": length}
    texts = calibrate.calibration_texts(cfg)
    random.Random(cfg.get("seed", 0)).shuffle(texts)
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    want = torch.tensor(stream[: n * length]).view(n, length)
    assert torch.equal(calibrate.calibration_tokens(tokenizer, cfg), want)


def test_recording_kernel_takes_the_packed_gemm_and_records_what_f_linear_computes():
    """Where torch has oneDNN, calibration's linears run its GEMM on weights packed at load (the engine's `onednn`
    kernel); outputs and statistics equal F.linear's up to float32 rounding, Hessians included."""
    import torch.nn.functional as F

    from pipeline.quantize.calibrate import RecordingKernel
    from pipeline.runtime.kernels import TorchKernel, onednn_available

    torch.manual_seed(0)
    x, w, b = torch.randn(3, 40, 96), torch.randn(72, 96), torch.randn(72)
    fast, plain = RecordingKernel(hessian=True), RecordingKernel(hessian=True, gemm=TorchKernel())
    prepared, outputs = [], []
    for kernel in (fast, plain):
        prepared.append(kernel.prepare(w))
        kernel.names = {id(prepared[-1]): "mlp.fc"}
        outputs.append(kernel(x, prepared[-1], b))
    if onednn_available():
        assert prepared[0].layout == torch._mkldnn  # packed once, at load
    assert torch.allclose(outputs[0], F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    got, want = fast.acc["mlp.fc"].tensors("m"), plain.acc["mlp.fc"].tensors("m")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-5), name
