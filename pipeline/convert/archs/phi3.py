"""Phi3ForCausalLM (Phi-3, Phi-3.5, Phi-4-mini): Llama-shaped with fused projections. `qkv_proj` holds [Q; K; V]
rows and `gate_up_proj` [gate; up] rows, each canonical part a named slice. Partial rotary
(`partial_rotary_factor`, Phi-4-mini) is written as `rotary_pct`; longrope scaling (short/long factors,
`original_max_position_embeddings`) passes through `rotary_scaling`."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from pipeline.checkpoint.layout import LLAMA_LAYOUT
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
    layout = LLAMA_LAYOUT
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
        if hf.get("original_max_position_embeddings"):
            cfg["original_max_position_embeddings"] = int(hf["original_max_position_embeddings"])
        if hf.get("sliding_window"):
            cfg["sliding_window"] = int(hf["sliding_window"])
        return cfg
