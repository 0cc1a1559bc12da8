"""Source fingerprints computed from the path alone (the cache key of a run): the raw GGUF header reader agrees with
gguf-py's on every field it reads, each fingerprint equals the opened source's own, and the key changes with the
bytes it covers (the whole GGUF header, HF configs and safetensors headers; tensor data through size and mtime)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.convert.sources import open_source, source_fingerprint
from pipeline.convert.sources.gguf_header import GGUFArray, GGUFHeaderError, gguf_fingerprint, read_gguf_header
from pipeline.errors import PipelineError
from tests.conftest import make_tiny_model


def write_gguf(path: Path, *, big_endian: bool = False, alignment: int | None = None) -> Path:
    """A small llama GGUF with every metadata value kind: scalars of each type, strings, string/int/float arrays
    (a vocabulary-like one), an F32 and a Q8_0 tensor."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama",
                             endianess=gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(8)
    writer.add_head_count_kv(2)
    writer.add_context_length(128)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_uint8("test.u8", 200)
    writer.add_int8("test.i8", -5)
    writer.add_uint16("test.u16", 60000)
    writer.add_int16("test.i16", -30000)
    writer.add_int32("test.i32", -7)
    writer.add_uint64("test.u64", 1 << 40)
    writer.add_int64("test.i64", -(1 << 40))
    writer.add_float64("test.f64", 0.125)
    writer.add_bool("test.flag", True)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_token_list([f"tok{i}\u00e9" for i in range(1000)])
    writer.add_token_types([1] * 1000)
    writer.add_token_scores([0.5] * 1000)
    writer.add_array("test.empty", [])
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((103, 64), dtype=np.float32))
    q8 = gguf.quants.quantize(rng.standard_normal((96, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_up.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_same_as_gguf_py(path: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(path))
    header = read_gguf_header(path)
    assert header.data_offset == reader.data_offset
    assert header.alignment == reader.alignment
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(header.metadata) == list(fields)
    for key, f in fields.items():
        value = header.metadata[key]
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            assert isinstance(value, GGUFArray) and value.count == len(f.data), key
            assert value.item_type == (int(f.types[1]) if len(f.types) > 1 else value.item_type), key
        else:
            assert value == pytest.approx(f.contents()), key
    assert [(t.name, t.dims, t.ggml_type, header.data_offset + t.offset) for t in header.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset)) for t in reader.tensors]


@pytest.mark.parametrize("big_endian,alignment", [(False, None), (True, None), (False, 64)])
def test_raw_header_reads_what_gguf_py_reads(tmp_path, big_endian, alignment):
    assert_same_as_gguf_py(write_gguf(tmp_path / "m.gguf", big_endian=big_endian, alignment=alignment))


def test_raw_header_of_the_default_model(smollm2_gguf):
    assert_same_as_gguf_py(smollm2_gguf)


def test_gguf_fingerprint_equals_the_opened_source(tmp_path, smollm2_gguf):
    """The cache key computed without opening the source is the one the opened source gives (and gave before the
    raw reader existed): existing caches stay valid."""
    for path in (write_gguf(tmp_path / "m.gguf"), smollm2_gguf):
        source = open_source("gguf", path)
        try:
            assert gguf_fingerprint(path) == source.fingerprint()
        finally:
            source.close()
        assert source_fingerprint("gguf", path) == gguf_fingerprint(path)


def _rewrite_keeping_mtime(path: Path, offset: int, byte: bytes) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(byte)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_gguf_fingerprint_covers_every_header_byte_and_the_data_through_size_and_mtime(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    before = gguf_fingerprint(path)
    header = read_gguf_header(path)
    raw = path.read_bytes()
    # One byte of a vocabulary string (deep in the metadata), same size, same mtime: a different key.
    at = raw.index("tok500\u00e9".encode())
    _rewrite_keeping_mtime(path, at + 3, b"9")
    assert gguf_fingerprint(path) != before
    _rewrite_keeping_mtime(path, at + 3, raw[at + 3:at + 4])
    assert gguf_fingerprint(path) == before
    # One byte of the tensor table (a tensor's offset), same size and mtime: a different key.
    at = raw.index(b"blk.0.ffn_up.weight") + len(b"blk.0.ffn_up.weight")
    _rewrite_keeping_mtime(path, at + 4, b"\x07")
    assert gguf_fingerprint(path) != before
    _rewrite_keeping_mtime(path, at + 4, raw[at + 4:at + 5])
    # Tensor data is covered by size and mtime_ns (as before the raw reader): an edit that writes it changes the key.
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(header.data_offset + 10)
        f.write(bytes([raw[header.data_offset + 10] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert gguf_fingerprint(path)["files"][0]["sha256_header"] == before["files"][0]["sha256_header"]
    assert gguf_fingerprint(path) != before


@pytest.mark.parametrize("damage", ["magic", "truncated", "empty", "version"])
def test_unreadable_gguf_falls_back_to_the_sources_error(tmp_path, damage):
    path = write_gguf(tmp_path / "m.gguf")
    raw = path.read_bytes()
    header = read_gguf_header(path)
    broken = {"magic": b"GGUX" + raw[4:], "truncated": raw[: header.data_offset - 40], "empty": b"",
              "version": raw[:4] + (9).to_bytes(4, "little") + raw[8:]}[damage]
    path.write_bytes(broken)
    with pytest.raises(GGUFHeaderError):
        read_gguf_header(path)
    with pytest.raises(PipelineError, match="not a readable GGUF file"):
        source_fingerprint("gguf", path)


def test_missing_gguf_names_the_path(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        source_fingerprint("gguf", tmp_path / "absent.gguf")


def _hf_variants(tiny: Path, root: Path) -> dict[str, Path]:
    """The tiny model as saved (one safetensors file), sharded with an index, and as a torch .bin."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    one = root / "single"
    shutil.copytree(tiny, one)
    state = load_file(str(one / "model.safetensors"))
    sharded = root / "sharded"
    shutil.copytree(tiny, sharded)
    (sharded / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: state[n].contiguous() for n in part}, str(sharded / file), metadata={"format": "pt"})
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}))
    binary = root / "bin"
    shutil.copytree(tiny, binary)
    (binary / "model.safetensors").unlink()
    torch.save({n: t.clone() for n, t in state.items()}, binary / "pytorch_model.bin")
    return {"single": one, "sharded": sharded, "bin": binary}


def test_hf_fingerprint_equals_the_opened_source_and_follows_the_config(tmp_path):
    tiny = make_tiny_model(tmp_path / "saved", "llama_mha_tied")
    for kind, directory in _hf_variants(tiny, tmp_path).items():
        source = open_source("hf", directory)
        try:
            want = source.fingerprint()
        finally:
            source.close()
        assert source_fingerprint("hf", directory) == want, kind
        config = directory / "config.json"
        text = config.read_text()
        st = config.stat()
        assert '"silu"' in text
        config.write_text(text.replace('"silu"', '"relu"', 1))  # same size, same mtime: only the content differs
        os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert source_fingerprint("hf", directory) != want, kind


def test_hf_fingerprint_of_a_broken_checkpoint_gives_the_sources_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PipelineError, match="no weights in"):
        source_fingerprint("hf", tmp_path)
    with pytest.raises(PipelineError, match="is not a directory"):
        source_fingerprint("hf", tmp_path / "config.json")


def test_only_kinds_that_can_hold_quantized_weights_are_asked():
    """`source_is_quantized` opens only the kinds listed in QUANTIZED_KINDS (the others answer False unopened):
    the list must name every registered source class that has a `quantized` attribute, and only those."""
    from pipeline.convert import sources

    from pipeline.convert.sources import gguf, hf, jax, modelopt, trtllm  # noqa: F401
    from pipeline.convert.sources import deepspeed, megatron, nemo  # noqa: F401 - each registers its kind

    can_hold = sorted(kind for kind, cls in sources.SOURCES.items() if hasattr(cls, "quantized"))
    assert can_hold == sorted(sources.QUANTIZED_KINDS)
    assert sources.source_is_quantized("gguf", Path("/nonexistent.gguf")) is False  # not opened: no error
