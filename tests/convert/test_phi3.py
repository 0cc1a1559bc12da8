"""Phi-3 written with TensorRT-LLM's Phi-3 fields (tensorrt_llm/models/phi3/config.py and convert.py): one fused
`mlp.fc` = [up; gate] per rank (no `mlp.gate`), hidden_act swiglu, and longrope as position_embedding_type
long_rope with longrope_scaling_short/long_factors and original_max_position_embeddings (no rotary_scaling)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint.validate import validate_checkpoint
from pipeline.convert.converter import convert
from pipeline.convert.registry import MappingArgs
from pipeline.convert.sources import open_source
from pipeline.schemas import schema_errors
from tests.runtime.test_rope_scaling import PHI3, tiny_phi3


@pytest.mark.parametrize("tp", [1, 2])
def test_phi3_checkpoint_has_trtllm_fields_and_fused_swiglu_fc(tmp_path, tp):
    model = tiny_phi3(tmp_path, **PHI3["phi3_longrope"])
    convert(open_source("hf", model), tmp_path / "ckpt", "float32", MappingArgs(tp, 1), progress=False)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert schema_errors(cfg, "checkpoint_config") == [] and validate_checkpoint(tmp_path / "ckpt") == []
    assert (cfg["architecture"], cfg["hidden_act"], cfg["rotary_pct"]) == ("Phi3ForCausalLM", "swiglu", 0.5)
    assert cfg["position_embedding_type"] == "long_rope" and cfg["rotary_scaling"] is None
    assert cfg["original_max_position_embeddings"] == 24
    assert cfg["longrope_scaling_short_factors"] == [1.0, 1.1, 1.3, 1.6]
    assert cfg["longrope_scaling_long_factors"] == [1.0, 3.0, 5.0, 9.0]
    ranks = [load_file(tmp_path / "ckpt" / f"rank{r}.safetensors") for r in range(tp)]
    assert not any(".mlp.gate." in name for r in ranks for name in r)
    gate, up = load_file(model / "model.safetensors")["model.layers.1.mlp.gate_up_proj.weight"].chunk(2)
    fcs = [r["transformer.layers.1.mlp.fc.weight"] for r in ranks]  # each [up_r; gate_r]
    assert torch.equal(torch.cat([f.chunk(2)[0] for f in fcs]), up)
    assert torch.equal(torch.cat([f.chunk(2)[1] for f in fcs]), gate)


def test_phi3_without_scaling_keeps_plain_rope(tmp_path):
    convert(open_source("hf", tiny_phi3(tmp_path)), tmp_path / "ckpt", "float32", MappingArgs(), progress=False)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["position_embedding_type"] == "rope_gpt_neox" and cfg["rotary_scaling"] is None
    assert "longrope_scaling_short_factors" not in cfg
