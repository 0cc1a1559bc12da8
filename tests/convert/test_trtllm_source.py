"""An existing TensorRT-LLM checkpoint as a source: resharding round trips for every tiny architecture are
byte-identical to direct conversions; re-typing equals converting in that dtype; quantized checkpoints are resharded
as stored; what cannot be exact is refused with one error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.convert.converter import convert
from pipeline.convert.registry import MappingArgs, get_spec
from pipeline.convert.sources import open_source
from pipeline.errors import PipelineError
from tests.conftest import MODEL_CLASSES, TINY_MODELS


def run(kind: str, path: Path, out: Path, tp: int = 1, pp: int = 1, dtype: str = "float32",
        quantization=None, stats_dir=None, **mapping):
    source = open_source(kind, path)
    try:
        return convert(source, out, dtype, MappingArgs(tp, pp, **mapping), progress=False,
                       quantization=quantization, stats_dir=stats_dir)
    finally:
        source.close()


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Same config and byte-identical rank files."""
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    ranks = sorted(p.name for p in a.glob("rank*.safetensors"))
    assert ranks == sorted(p.name for p in b.glob("rank*.safetensors"))
    for name in ranks:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _arch(model: str) -> str:
    return MODEL_CLASSES[TINY_MODELS[model][0]]


@pytest.mark.parametrize("model", sorted(TINY_MODELS))
def test_reshard_round_trip_is_bit_identical(tiny_models, tmp_path, model):
    """HF -> tp1 -> (trtllm source) tp2 x pp2 (tp2 where TensorRT-LLM has no PP) -> (trtllm source) tp1: every
    checkpoint equals the direct conversion of the HF model to the same mapping, byte for byte."""
    pp = 2 if get_spec(_arch(model)).supports_pp else 1
    hf = tiny_models[model]
    run("hf", hf, tmp_path / "tp1")
    run("trtllm", tmp_path / "tp1", tmp_path / "via_tp2pp2", tp=2, pp=pp)
    run("hf", hf, tmp_path / "direct_tp2pp2", tp=2, pp=pp)
    assert_same_checkpoint(tmp_path / "via_tp2pp2", tmp_path / "direct_tp2pp2")
    run("trtllm", tmp_path / "via_tp2pp2", tmp_path / "back_tp1")
    assert_same_checkpoint(tmp_path / "back_tp1", tmp_path / "tp1")


@pytest.mark.parametrize("model,mapping", [
    ("llama_gqa_untied", dict(tp=4, use_parallel_embedding=True, embedding_sharding_dim=0)),
    ("llama_gqa_untied", dict(tp=2, use_parallel_embedding=True, embedding_sharding_dim=1)),
    ("mistral_mqa", dict(tp=4, pp=3)),
    ("mixtral_4e_top2", dict(tp=2, moe_tp_size=1, moe_ep_size=2)),
    ("mixtral_4e_top2", dict(tp=4, pp=2, moe_tp_size=2, moe_ep_size=2)),
])
def test_reshard_between_parallel_layouts(tiny_models, tmp_path, model, mapping):
    """From one sharded checkpoint (tp2 x pp2, parallel embedding on dim 1) straight to another layout."""
    hf = tiny_models[model]
    start = dict(tp=2, pp=2, use_parallel_embedding=True, embedding_sharding_dim=1)
    run("hf", hf, tmp_path / "start", **start)
    run("trtllm", tmp_path / "start", tmp_path / "via", **mapping)
    run("hf", hf, tmp_path / "direct", **mapping)
    assert_same_checkpoint(tmp_path / "via", tmp_path / "direct")


@pytest.mark.parametrize("model", ["llama_gqa_untied", "gemma2_softcap", "gpt2"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_retype_equals_direct_conversion(tiny_models, tmp_path, model, dtype):
    hf = tiny_models[model]
    run("hf", hf, tmp_path / "fp32")
    run("trtllm", tmp_path / "fp32", tmp_path / "via", tp=2, dtype=dtype)
    run("hf", hf, tmp_path / "direct", tp=2, dtype=dtype)
    assert_same_checkpoint(tmp_path / "via", tmp_path / "direct")


def test_tokenizer_directory_is_carried(tiny_models, tmp_path):
    run("hf", tiny_models["llama_mha_tied"], tmp_path / "ckpt")
    source = open_source("trtllm", tmp_path / "ckpt")
    assert source.tokenizer() is None  # the tiny model has none; a checkpoint with tokenizer/ gives it
    fp = source.fingerprint()
    assert fp["format"] == "trtllm" and len(fp["files"]) == 2


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.fixture
def tp2_checkpoint(tiny_models, tmp_path) -> Path:
    out = tmp_path / "tp2"
    run("hf", tiny_models["llama_gqa_untied"], out, tp=2)
    return out


def _error(path: Path) -> str:
    with pytest.raises(PipelineError) as e:
        open_source("trtllm", path)
    return str(e.value)


def test_rank_files_disagree_with_mapping(tp2_checkpoint):
    cfg = json.loads((tp2_checkpoint / "config.json").read_text())
    cfg["mapping"] = {"world_size": 4, "tp_size": 4, "pp_size": 1}
    (tp2_checkpoint / "config.json").write_text(json.dumps(cfg))
    msg = _error(tp2_checkpoint)
    assert "inconsistent" in msg and "rank" in msg and "\n" not in msg


def test_extra_rank_file(tp2_checkpoint):
    shutil.copy(tp2_checkpoint / "rank1.safetensors", tp2_checkpoint / "rank2.safetensors")
    assert "rank2.safetensors: not expected for world_size=2" in _error(tp2_checkpoint)


def test_missing_rank_file(tp2_checkpoint):
    (tp2_checkpoint / "rank1.safetensors").unlink()
    assert "rank1.safetensors: missing" in _error(tp2_checkpoint)


def test_rank_piece_of_wrong_shape(tp2_checkpoint):
    tensors = load_file(tp2_checkpoint / "rank0.safetensors")
    tensors["transformer.layers.0.mlp.fc.weight"] = tensors["transformer.layers.0.mlp.fc.weight"][:-1]
    save_file(tensors, tp2_checkpoint / "rank0.safetensors")
    msg = _error(tp2_checkpoint)
    assert "transformer.layers.0.mlp.fc.weight" in msg and "shape" in msg


def test_unknown_producer(tp2_checkpoint):
    cfg = json.loads((tp2_checkpoint / "config.json").read_text())
    cfg["producer"] = {"name": "someone-else", "version": "1"}
    (tp2_checkpoint / "config.json").write_text(json.dumps(cfg))
    assert "producer" in _error(tp2_checkpoint)


def test_not_a_checkpoint(tmp_path):
    assert "config.json is missing" in _error(tmp_path)
