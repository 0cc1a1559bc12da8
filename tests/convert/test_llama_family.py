"""Tiny random Llama / Mistral / Qwen2 models: convert for many mappings, reassemble the rank shards and compare
with the source weights exactly (fp32); check names and shapes per rank against the checkpoint spec."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.checkpoint.validate import validate_checkpoint
from pipeline.convert.converter import convert
from pipeline.convert.registry import MappingArgs
from pipeline.convert.sources import open_source
from pipeline.schemas import schema_errors
from tests.convert.reassemble import reassemble_llama, stage_layers

MAPPINGS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)]


def run_convert(model_dir, out, tp, pp, dtype="float32", **mapping):
    source = open_source("hf", model_dir)
    try:
        return convert(source, out, dtype, MappingArgs(tp, pp, **mapping), progress=False)
    finally:
        source.close()


def hf_weights(model_dir) -> dict[str, torch.Tensor]:
    weights = load_file(model_dir / "model.safetensors")
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("tie_word_embeddings"):
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights


@pytest.mark.parametrize("tp,pp", MAPPINGS, ids=[f"tp{t}pp{p}" for t, p in MAPPINGS])
@pytest.mark.parametrize("model", ["llama_gqa_untied", "llama_mha_tied", "mistral_mqa", "qwen2_bias"])
def test_reassembled_shards_equal_source(tiny_models, tmp_path, model, tp, pp):
    run_convert(tiny_models[model], tmp_path, tp, pp)
    assert validate_checkpoint(tmp_path) == []
    got = reassemble_llama(tmp_path)
    want = hf_weights(tiny_models[model])
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("sharding_dim", [0, 1])
def test_parallel_embedding_roundtrip(tiny_models, tmp_path, sharding_dim):
    run_convert(tiny_models["llama_gqa_untied"], tmp_path, 4, 1, use_parallel_embedding=True,
                embedding_sharding_dim=sharding_dim)
    rank0 = load_file(tmp_path / "rank0.safetensors")
    # vocab 103 over 4 ranks: ceil(103/4) = 26 rows each (padded); hidden 64 / 4 = 16 columns.
    assert tuple(rank0["transformer.vocab_embedding.weight"].shape) == ((26, 64) if sharding_dim == 0 else (103, 16))
    got = reassemble_llama(tmp_path)
    want = hf_weights(tiny_models["llama_gqa_untied"])
    assert torch.equal(got["model.embed_tokens.weight"], want["model.embed_tokens.weight"])


def expected_rank_shapes(cfg: dict, tp: int, pp: int, pp_rank: int) -> dict[str, tuple[int, ...]]:
    """Per-rank names and shapes as the checkpoint spec (section 2.1) states them, written out by hand."""
    h, nh, nkv, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"]
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    kvl = math.ceil(nkv / tp)
    shapes = {}
    if pp_rank == 0:
        shapes["transformer.vocab_embedding.weight"] = (vocab, h)
    for j in range(len(stage_layers(cfg["num_hidden_layers"], pp)[pp_rank])):
        p = f"transformer.layers.{j}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "attention.qkv.weight"] = ((nh // tp + 2 * kvl) * d, h)
        if cfg.get("attn_bias"):
            shapes[p + "attention.qkv.bias"] = ((nh // tp + 2 * kvl) * d,)
        shapes[p + "attention.dense.weight"] = (h, nh * d // tp)
        if cfg.get("attn_bias") and cfg["architecture"] != "Qwen2ForCausalLM":
            shapes[p + "attention.dense.bias"] = (h,)
        shapes[p + "post_layernorm.weight"] = (h,)
        shapes[p + "mlp.fc.weight"] = (inter // tp, h)
        shapes[p + "mlp.gate.weight"] = (inter // tp, h)
        shapes[p + "mlp.proj.weight"] = (h, inter // tp)
    if pp_rank == pp - 1:
        shapes["transformer.ln_f.weight"] = (h,)
        shapes["lm_head.weight"] = (math.ceil(vocab / tp), h)
    return shapes


@pytest.mark.parametrize("tp,pp", MAPPINGS, ids=[f"tp{t}pp{p}" for t, p in MAPPINGS])
@pytest.mark.parametrize("model", ["llama_gqa_untied", "mistral_mqa", "qwen2_bias"])
def test_names_shapes_dtypes_per_rank_match_spec(tiny_models, tmp_path, model, tp, pp):
    result = run_convert(tiny_models[model], tmp_path, tp, pp, dtype="bfloat16")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert schema_errors(cfg, "checkpoint_config") == []
    assert cfg["mapping"] == {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}
    assert sorted(p.name for p in tmp_path.glob("rank*.safetensors")) == sorted(
        f"rank{r}.safetensors" for r in range(tp * pp))
    assert_bf16_ranks_match_spec(tmp_path, cfg, result, tp, pp)


def test_config_fields(tiny_models, tmp_path):
    run_convert(tiny_models["qwen2_bias"], tmp_path, 2, 1)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architecture"] == "Qwen2ForCausalLM"
    assert cfg["qwen_type"] == "qwen2" and cfg["attn_bias"] is True
    assert cfg["position_embedding_type"] == "rope_gpt_neox"
    assert cfg["num_key_value_heads"] == 2 and cfg["head_size"] == 16
    run_convert(tiny_models["llama_gqa_untied"], tmp_path / "llama", 1, 1)
    cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert cfg["rotary_base"] == 5000.0 and cfg["rotary_scaling"] is None
    assert cfg["tie_word_embeddings"] is False and cfg["hidden_act"] == "silu"


def test_rope_scaling_is_carried(tmp_path):
    from tests.conftest import make_tiny_model

    scaling = {"rope_type": "linear", "factor": 2.0}
    model_dir = make_tiny_model(tmp_path, "llama_mha_tied", rope_scaling=scaling)
    run_convert(model_dir, tmp_path / "out", 1, 1)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["rotary_scaling"]["factor"] == 2.0
    assert cfg["rotary_scaling"].get("rope_type", cfg["rotary_scaling"].get("type")) == "linear"


def test_sharded_checkpoint_with_index(tiny_models, tmp_path):
    """A sharded HF checkpoint (several safetensors files plus an index) converts to the same tensors."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["llama_gqa_untied"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    run_convert(tmp_path / "sharded", tmp_path / "a", 2, 1)
    run_convert(tiny_models["llama_gqa_untied"], tmp_path / "b", 2, 1)
    for r in range(2):
        a, b = load_file(tmp_path / "a" / f"rank{r}.safetensors"), load_file(tmp_path / "b" / f"rank{r}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pytorch_bin_checkpoint(tiny_models, tmp_path):
    """pytorch_model.bin sources load through torch.load(weights_only=True)."""
    weights = load_file(tiny_models["llama_gqa_untied"] / "model.safetensors")
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text((tiny_models["llama_gqa_untied"] / "config.json").read_text())
    torch.save(weights, src / "pytorch_model.bin")
    run_convert(src, tmp_path / "out", 2, 1)
    got = reassemble_llama(tmp_path / "out")
    assert all(torch.equal(got[k], v) for k, v in weights.items())


def assert_bf16_ranks_match_spec(out, cfg, result, tp: int, pp: int, expected=None) -> None:
    """Every rank file holds exactly the spec's names and shapes (`expected(cfg, tp, pp, pp_rank)`), all bfloat16,
    and the converter reports them."""
    for pp_rank in range(pp):
        want = (expected or expected_rank_shapes)(cfg, tp, pp, pp_rank)
        for tp_rank in range(tp):
            rank = pp_rank * tp + tp_rank
            with safe_open(str(out / f"rank{rank}.safetensors"), "pt") as f:
                got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
            assert got == want, f"rank {rank}"
            assert sorted(result.written[rank]) == sorted(want)
