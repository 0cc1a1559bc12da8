"""Phi3ForCausalLM (Phi-3, Phi-3.5, Phi-4-mini): Llama-shaped with fused projections. `qkv_proj` holds [Q; K; V]
rows and `gate_up_proj` [gate; up] rows, each canonical part a named slice.

Written with TensorRT-LLM's Phi-3 fields (its Phi3Config.from_hugging_face and load_weights_from_hf_model): one
`mlp.fc` = [up; gate] (the halves of gate_up_proj swapped) with hidden_act `swiglu`; partial rotary
(`partial_rotary_factor`, Phi-4-mini) as `rotary_pct`; longrope as position_embedding_type `long_rope` with
`longrope_scaling_short_factors`, `longrope_scaling_long_factors` and `original_max_position_embeddings`, no
`rotary_scaling`. TensorRT-LLM writes long_rope only for max_position_embeddings >= 128000 (every released
longrope Phi-3); a smaller model with longrope scaling is written as long_rope too, which is what transformers
computes for it."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from pipeline.checkpoint.layout import PHI3_LAYOUT
from pipeline.convert.archs.gpt import qkv_part
from pipeline.convert.archs.llama import llama_like_config
from pipeline.convert.canonical import Canon
from pipeline.convert.registry import ArchSpec, MappingArgs, register

_L = "model.layers.{layer}"


def gate_up_part(index: int):
    """Half `index` of the fused [gate; up] rows (0: gate, the activated branch; 1: up)."""

    def take(t: torch.Tensor, cfg: Mapping[str, Any]) -> torch.Tensor:
        return t.chunk(2, dim=0)[index]

    take.__name__ = f"gate_up_part_{('gate', 'up')[index]}"
    return take


@register("Phi3ForCausalLM")
class Phi3Spec(ArchSpec):
    layout = PHI3_LAYOUT
    source_names = {
        Canon.VOCAB_EMBED: "model.embed_tokens.weight",
        Canon.ATTN_NORM: f"{_L}.input_layernorm.weight",
        **{c: f"{_L}.self_attn.qkv_proj.weight" for c in (Canon.ATTN_Q, Canon.ATTN_K, Canon.ATTN_V)},
        Canon.ATTN_OUT: f"{_L}.self_attn.o_proj.weight",
        Canon.MLP_NORM: f"{_L}.post_attention_layernorm.weight",
        Canon.MLP_ACT_IN: f"{_L}.mlp.gate_up_proj.weight",
        Canon.MLP_LINEAR_IN: f"{_L}.mlp.gate_up_proj.weight",
        Canon.MLP_OUT: f"{_L}.mlp.down_proj.weight",
        Canon.FINAL_NORM: "model.norm.weight",
        Canon.LM_HEAD: "lm_head.weight",
    }
    transforms = {
        **{c: qkv_part(i, transposed=False) for i, c in enumerate((Canon.ATTN_Q, Canon.ATTN_K, Canon.ATTN_V))},
        Canon.MLP_ACT_IN: gate_up_part(0),
        Canon.MLP_LINEAR_IN: gate_up_part(1),
    }
    dropped = ("model.layers.{layer}.self_attn.rotary_emb.inv_freq",)

    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        cfg = llama_like_config(self.architecture, hf, dtype, mapping, default_rope_base=10000.0)
        params = hf.get("rope_parameters") or {}
        cfg["rotary_pct"] = float(hf.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0)
        if cfg["hidden_act"] == "silu":
            cfg["hidden_act"] = "swiglu"
        if hf.get("original_max_position_embeddings"):
            cfg["original_max_position_embeddings"] = int(hf["original_max_position_embeddings"])
        scaling = cfg.get("rotary_scaling") or {}
        if scaling.get("type", scaling.get("rope_type")) in ("longrope", "su"):
            cfg.update(position_embedding_type="long_rope", rotary_scaling=None,
                       original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
                       longrope_scaling_short_factors=[float(x) for x in scaling["short_factor"]],
                       longrope_scaling_long_factors=[float(x) for x in scaling["long_factor"]])
        if hf.get("sliding_window"):
            cfg["sliding_window"] = int(hf["sliding_window"])
        return cfg
