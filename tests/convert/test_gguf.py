"""The GGUF source on the default model (SmolLM2-135M-Instruct, Q4_1): its converted tensors equal what
`transformers` loads from the same file."""

from __future__ import annotations

import pytest
import torch

from pipeline.convert.converter import convert
from pipeline.convert.registry import MappingArgs
from pipeline.convert.sources import open_source
from pipeline.convert.sources.gguf import unpermute_rows
from tests.convert.reassemble import reassemble_llama


def test_unpermute_inverts_llama_cpp_permutation():
    heads, head_dim, cols = 3, 8, 5
    w = torch.randn(heads * head_dim, cols)
    # llama.cpp's convert permutes rows per head: (h, 2, d/2) -> (h, d/2, 2).
    permuted = w.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(unpermute_rows(permuted, heads), w)
    assert not torch.equal(permuted, w)


@pytest.fixture(scope="module")
def hf_reference(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model.config, state


def test_gguf_config_matches_transformers(smollm2_gguf, hf_reference):
    hf_config, _ = hf_reference
    source = open_source("gguf", smollm2_gguf)
    cfg = source.hf_config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert cfg[key] == getattr(hf_config, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(hf_config.rms_norm_eps)
    theta = getattr(hf_config, "rope_theta", None) or hf_config.rope_parameters["rope_theta"]
    assert cfg["rope_theta"] == pytest.approx(theta)


@pytest.mark.parametrize("tp,pp", [(1, 1), (3, 2)])
def test_gguf_tensors_equal_transformers(smollm2_gguf, hf_reference, tmp_path, tp, pp):
    _, want = hf_reference
    source = open_source("gguf", smollm2_gguf)
    convert(source, tmp_path, "float32", MappingArgs(tp, pp), progress=False)
    got = reassemble_llama(tmp_path)
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_transformers_loads_through_the_source_equal_plain_transformers_loads(smollm2_gguf, hf_reference):
    """GGUFSource shares one gguf-py parse between transformers' tokenizer and model loads (a speed-up of the
    reference stage): the model and tokenizer are the ones transformers builds on its own, and gguf-py is restored."""
    import gguf
    from transformers import AutoTokenizer

    reader, names = gguf.GGUFReader, gguf.get_tensor_name_map
    source = open_source("gguf", smollm2_gguf)
    try:
        tokenizer = source.tokenizer()
        model = source.transformers_model(torch.float32)
        assert source.tokenizer() is tokenizer  # built once per opened source
    finally:
        source.close()
    assert gguf.GGUFReader is reader and gguf.get_tensor_name_map is names
    _, want = hf_reference
    got = model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    plain = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    text = "Summarize: the quick brown fox jumps over the lazy dog. <|im_start|>user\nHi ünïcode 123"
    assert tokenizer.get_vocab() == plain.get_vocab() and tokenizer(text).input_ids == plain(text).input_ids
