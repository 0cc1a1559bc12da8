"""A tiny Llama with a real (tiny) tokenizer, so calibration can tokenize text, and its calibration statistics.

Its dimensions suit every quantized layout at tp in {1, 2}: per-rank widths are multiples of 64 (the GPTQ kernel
layout's tile) and of the test group size 64."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CALIB = Path(__file__).resolve().parents[2] / "pipeline" / "datasets" / "calib_text.jsonl"
GROUP = 64
CALIBRATION = dict(dataset=None, text_field="text", dataset_split="train", calib_size=8, calib_max_seq_length=64,
                   batch_size=4, seed=0)


def tiny_tokenizer():
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [json.loads(line)["text"] for line in CALIB.read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=384, special_tokens=["<eos>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="session")
def quant_model(tmp_path_factory) -> Path:
    import transformers

    out = tmp_path_factory.mktemp("quant_model") / "llama"
    tokenizer = tiny_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=0,
                                      bos_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a few outlier input channels, as real activations have: what AWQ/SmoothQuant are for
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 8.0
            layer.post_attention_layernorm.weight[:4] *= 8.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def quant_stats(quant_model, tmp_path_factory) -> Path:
    from pipeline.convert.sources import open_source
    from pipeline.quantize.calibrate import calibrate

    out = tmp_path_factory.mktemp("calibration")
    src = open_source("hf", quant_model)
    try:
        calibrate(src, out, CALIBRATION, True, None, progress=False)
    finally:
        src.close()
    return out


def quantization(algo: str | None, kv: str | None = None, **extra) -> dict:
    return {"quant_algo": algo, "kv_cache_quant_algo": kv, "group_size": GROUP, "smoothquant_val": 0.5,
            "has_zero_point": False, "pre_quant_scale": False, "exclude_modules": None, "gptq_damp": 0.01,
            "awq_grid": 10, "gptq_sm": 80, "calibration": CALIBRATION, **extra}


def convert_quantized(model: Path, stats: Path, out: Path, algo: str | None, kv: str | None = None, tp: int = 1,
                      pp: int = 1, dtype: str = "float32", **extra):
    from pipeline.convert.converter import convert
    from pipeline.convert.registry import MappingArgs
    from pipeline.convert.sources import open_source

    src = open_source("hf", model)
    try:
        return convert(src, out, dtype, MappingArgs(tp, pp), progress=False,
                       quantization=quantization(algo, kv, **extra), stats_dir=stats)
    finally:
        src.close()
