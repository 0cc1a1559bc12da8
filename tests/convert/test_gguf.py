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


def _tokenizer_gguf(path, arch: str, name: str) -> None:
    """A one-block GGUF of `arch` whose vocabulary is byte-level BPE (gpt2 model: 256 bytes, a few merges and two
    special tokens) or, for gemma3, sentencepiece (llama model: pieces with scores and token types)."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    for add, value in ((writer.add_block_count, 1), (writer.add_embedding_length, 64), (writer.add_head_count, 4),
                       (writer.add_feed_forward_length, 96), (writer.add_head_count_kv, 2),
                       (writer.add_context_length, 128)):
        add(value)
    if arch == "gemma3":
        pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "h", "i", "▁hi", "▁the"]
        writer.add_tokenizer_model("llama")
        writer.add_token_list(pieces)
        writer.add_token_scores([0.0] * 260 + [-1.0, -2.0, -3.0, -0.5, -0.25])
        writer.add_token_types([3, 3, 3, 2] + [6] * 256 + [1] * 5)
        writer.add_bos_token_id(2)
        writer.add_eos_token_id(1)
    else:
        byte_tokens = list(bytes_to_unicode().values())
        merges = ["Ġ t", "h e", "Ġt he", "i n"]
        tokens = byte_tokens + [m.replace(" ", "") for m in merges] + ["<|endoftext|>", "<|im_start|>"]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
        writer.add_token_list(tokens)
        writer.add_token_merges(merges)
        writer.add_token_types([1] * (len(tokens) - 2) + [3, 3])
        writer.add_bos_token_id(len(tokens) - 2)
        writer.add_eos_token_id(len(tokens) - 2)
    vocab = 265 if arch == "gemma3" else 262
    writer.add_tensor("token_embd.weight", np.zeros((vocab, 64), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch, name", [("llama", "tiny-smol"), ("qwen2", "tiny-qwen"), ("gemma3", "tiny-gemma"),
                                        ("llama", "Mistral-tiny")])
def test_tokenizer_from_the_header_equals_transformers_own(tmp_path, arch, name):
    """GGUFSource answers AutoTokenizer's config-only parse from its struct header (the model type and name that
    pick the tokenizer class): the tokenizer is the one transformers builds on its own: same class, backend
    (normalizer, pre-tokenizer, model, decoder, added tokens), settings and ids; gguf-py's parse is not run."""
    import gguf
    from transformers import AutoTokenizer

    path = tmp_path / f"{arch}.gguf"
    _tokenizer_gguf(path, arch, name)
    plain = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    parses = []
    original = gguf.GGUFReader

    class CountingReader(original):
        def __init__(self, *args, **kwargs):
            parses.append(args)
            super().__init__(*args, **kwargs)

    gguf.GGUFReader = CountingReader
    source = open_source("gguf", path)
    try:
        got = source.tokenizer()
    finally:
        gguf.GGUFReader = original
        source.close()
    assert type(got) is type(plain)
    assert got.backend_tokenizer.to_str() == plain.backend_tokenizer.to_str()
    assert got.init_kwargs == plain.init_kwargs
    text = " the hi <|im_start|>in the ünï"
    assert got(text).input_ids == plain(text).input_ids
    # a Mistral-named llama file keeps transformers' own parse (transformers renames its architecture)
    assert len(parses) == (1 if "mistral" in name.lower() else 0)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_torch_dequantizers_equal_gguf_py_bit_for_bit(qtype):
    """The whole-tensor torch dequantizers give gguf-py's values exactly, on random block bytes whose f16 scales
    include subnormals, zeros, negatives, infinities and NaN (the bytes are arbitrary), in a 3-d and a 1-row shape."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    from pipeline.convert.sources.gguf import GGUFTensor, TORCH_DEQUANTIZERS, dequantize_tensor

    kind = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(0)
    for rows in ((3, 5), (1,)):
        raw = rng.integers(0, 256, size=(*rows, 7 * size), dtype=np.uint8)
        scales = raw.reshape(-1, size)[:, :2].copy().view(np.float16)
        scales[:6, 0] = [0.0, -0.0, 6e-8, -np.inf, np.nan, 65504.0]  # rows of blocks: specials in the first ones
        raw.reshape(-1, size)[:, :2] = scales.view(np.uint8)
        with np.errstate(invalid="ignore"):  # inf * 0 in the reference
            want = dequantize(raw, kind)
        got = dequantize_tensor(GGUFTensor("t", kind, (7 * block, *reversed(rows)), raw))
        assert qtype in TORCH_DEQUANTIZERS and got.dtype == torch.float32
        assert np.array_equal(got.reshape(want.shape).numpy(), want, equal_nan=True)
