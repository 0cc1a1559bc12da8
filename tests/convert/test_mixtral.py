"""Tiny random Mixtral models: experts stacked per TensorRT-LLM's MoE layout, split over moe_tp and moe_ep,
reassembled with an independent inverse and compared with the source exactly; per-rank names, shapes and dtypes
(the router stays float32); both source layouts (one matrix per expert, and the fused stacked one)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.checkpoint.validate import validate_checkpoint
from pipeline.convert.converter import convert
from pipeline.convert.registry import MappingArgs
from pipeline.convert.sources import open_source
from pipeline.errors import PipelineError
from pipeline.schemas import schema_errors
from tests.convert.reassemble import reassemble_llama, reassemble_moe, stage_layers

# (tp, pp, moe_ep): pure moe_tp, pure moe_ep, both, pipeline stages
MAPPINGS = [(1, 1, None), (2, 1, None), (2, 1, 2), (4, 1, 4), (4, 1, 2), (1, 2, None), (2, 2, 2)]
IDS = [f"tp{t}pp{p}ep{e or 1}" for t, p, e in MAPPINGS]


def run_convert(model_dir, out, tp, pp, ep=None, dtype="float32", **mapping):
    source = open_source("hf", model_dir)
    try:
        return convert(source, out, dtype, MappingArgs(tp, pp, moe_ep_size=ep, **mapping), progress=False)
    finally:
        source.close()


@pytest.mark.parametrize("tp,pp,ep", MAPPINGS, ids=IDS)
def test_reassembled_shards_equal_source(tiny_models, tmp_path, tp, pp, ep):
    run_convert(tiny_models["mixtral_4e_top2"], tmp_path, tp, pp, ep)
    assert validate_checkpoint(tmp_path) == []
    got = {**reassemble_llama(tmp_path), **reassemble_moe(tmp_path)}
    want = load_file(tiny_models["mixtral_4e_top2"] / "model.safetensors")
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def expected_moe_shapes(cfg: dict, tp: int, ep: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Per-layer MoE tensors as the checkpoint spec (sections 2.2 and 3.1) states them, written out by hand."""
    e, h, inter = cfg["moe"]["num_experts"], cfg["hidden_size"], cfg["intermediate_size"]
    moe_tp = tp // ep
    return {"mlp.router.weight": ((e, h), "F32"), "mlp.fc.weight": ((e // ep, 2 * inter // moe_tp, h), "BF16"),
            "mlp.proj.weight": ((e // ep, h, inter // moe_tp), "BF16")}


@pytest.mark.parametrize("tp,pp,ep", MAPPINGS, ids=IDS)
def test_names_shapes_dtypes_per_rank_match_spec(tiny_models, tmp_path, tp, pp, ep):
    run_convert(tiny_models["mixtral_4e_top2"], tmp_path, tp, pp, ep, dtype="bfloat16")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert schema_errors(cfg, "checkpoint_config") == []
    h, nh, nkv, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"]
    moe = expected_moe_shapes(cfg, tp, ep or 1)
    for pp_rank, layers in enumerate(stage_layers(cfg["num_hidden_layers"], pp)):
        want = {}
        if pp_rank == 0:
            want["transformer.vocab_embedding.weight"] = ((cfg["vocab_size"], h), "BF16")
        for j in range(len(layers)):
            p = f"transformer.layers.{j}."
            want[p + "input_layernorm.weight"] = ((h,), "BF16")
            want[p + "attention.qkv.weight"] = (((nh // tp + 2 * math.ceil(nkv / tp)) * d, h), "BF16")
            want[p + "attention.dense.weight"] = ((h, nh * d // tp), "BF16")
            want[p + "post_layernorm.weight"] = ((h,), "BF16")
            want.update({p + k: v for k, v in moe.items()})
        if pp_rank == pp - 1:
            want["transformer.ln_f.weight"] = ((h,), "BF16")
            want["lm_head.weight"] = ((math.ceil(cfg["vocab_size"] / tp), h), "BF16")
        for tp_rank in range(tp):
            with safe_open(str(tmp_path / f"rank{pp_rank * tp + tp_rank}.safetensors"), "pt") as f:
                got = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
            assert got == want, f"rank {pp_rank * tp + tp_rank}"


def test_config_fields_and_mapping_keys(tiny_models, tmp_path):
    run_convert(tiny_models["mixtral_8e_top1_mqa"], tmp_path / "tp", 2, 1)
    cfg = json.loads((tmp_path / "tp" / "config.json").read_text())
    assert cfg["architecture"] == "MixtralForCausalLM" and cfg["hidden_act"] == "swiglu"
    assert cfg["moe"] == {"num_experts": 8, "top_k": 1, "normalization_mode": 1}
    # moe_tp = tp, moe_ep = 1 is what a mapping without MoE keys means: keys every release knows only
    assert cfg["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    run_convert(tiny_models["mixtral_8e_top1_mqa"], tmp_path / "ep", 4, 1, 2)
    cfg = json.loads((tmp_path / "ep" / "config.json").read_text())
    assert cfg["mapping"] == {"world_size": 4, "tp_size": 4, "pp_size": 1, "moe_tp_size": 2, "moe_ep_size": 2}
    assert schema_errors(cfg, "checkpoint_config") == []


def test_fused_source_layout_converts_identically(tiny_models, tmp_path):
    """transformers 5 keeps experts stacked ([gate; up] in gate_up_proj) and can save them so."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["mixtral_4e_top2"])
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    with safe_open(str(tmp_path / "fused" / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in set(f.keys())
    run_convert(tmp_path / "fused", tmp_path / "a", 4, 1, 2)
    run_convert(tiny_models["mixtral_4e_top2"], tmp_path / "b", 4, 1, 2)
    for r in range(4):
        a, b = load_file(tmp_path / "a" / f"rank{r}.safetensors"), load_file(tmp_path / "b" / f"rank{r}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("tp,moe_tp,ep,message", [
    (2, None, 3, "moe_tp_size x moe_ep_size must equal tp_size=2"),
    (4, 1, 2, "moe_tp_size x moe_ep_size must equal tp_size=4"),
    (4, None, 8, "moe_tp_size x moe_ep_size must equal tp_size=4"),
])
def test_inconsistent_moe_sizes_are_clear_errors(tiny_models, tmp_path, tp, moe_tp, ep, message):
    with pytest.raises(PipelineError, match=message):
        run_convert(tiny_models["mixtral_4e_top2"], tmp_path, tp, 1, ep, moe_tp_size=moe_tp)


def test_model_that_does_not_fit_the_moe_mapping(tiny_models, tmp_path):
    with pytest.raises(PipelineError, match=r"num_experts=4 is not divisible by moe_ep_size=8"):
        run_convert(tiny_models["mixtral_4e_top2"], tmp_path / "a", 8, 1, 8)
    # I = 32 over moe_tp 3 (tp 3, 1 KV head duplicated): the inner size does not split
    with pytest.raises(PipelineError, match=r"intermediate_size=32 is not divisible by moe_tp_size=3"):
        run_convert(tiny_models["mixtral_8e_top1_mqa"], tmp_path / "b", 3, 1)


def test_missing_expert_names_the_tensor(tiny_models, tmp_path):
    weights = load_file(tiny_models["mixtral_4e_top2"] / "model.safetensors")
    del weights["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((tiny_models["mixtral_4e_top2"] / "config.json").read_text())
    save_file(weights, src / "model.safetensors")
    with pytest.raises(PipelineError, match=r"experts\.3\.w2\.weight \(for layers\.1\.moe\.out\.weight\)"):
        run_convert(src, tmp_path / "out", 1, 1)
