"""Mixtral (MixtralForCausalLM): Llama attention with a sparse mixture-of-experts MLP, written as TensorRT-LLM's
LLaMAForCausalLM with a `moe` object.

Experts come in two source layouts, both bound here:
- one matrix per expert (`block_sparse_moe.experts.{e}.w1/w2/w3`, what Mixtral checkpoints on disk and
  transformers' default `save_pretrained` hold): `{expert}` templates, stacked by the converter while reading;
- already stacked (`mlp.experts.gate_up_proj` (E, 2I, H) with [gate; up] per expert, and `mlp.experts.down_proj`
  (E, H, I)), what transformers 5 keeps in memory and writes with `save_original_format=False`: the gate and up
  halves are named slices.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from pipeline.checkpoint.layout import MIXTRAL_LAYOUT
from pipeline.convert.archs.llama import LLAMA_SOURCE_NAMES, llama_like_config
from pipeline.convert.canonical import Canon
from pipeline.convert.registry import ArchSpec, MappingArgs, SourceName, Transform, register

_SPARSE = "model.layers.{layer}.block_sparse_moe"
_FUSED = "model.layers.{layer}.mlp"

# TensorRT-LLM's MoeConfig.ExpertScaleNormalizationMode.RENORMALIZE: the top-k routing weights are renormalized
# to sum to 1 (top-k of the logits, then softmax over them: the same as Mixtral's softmax, top-k, divide by the sum).
RENORMALIZE = 1


def gate_up_half(index: int) -> Transform:
    """Half `index` (0 = gate, the activated branch; 1 = up) of a stacked (E, 2I, H) gate_up_proj."""

    def take(t: torch.Tensor, cfg: Mapping[str, Any]) -> torch.Tensor:
        inner = t.shape[1] // 2
        return t.narrow(1, index * inner, inner)

    take.__name__ = f"gate_up_half_{('gate', 'up')[index]}"
    return take


MIXTRAL_SOURCE_NAMES: dict[Canon, Any] = {
    **{c: n for c, n in LLAMA_SOURCE_NAMES.items() if not c.name.startswith("MLP_") or c is Canon.MLP_NORM},
    Canon.MOE_ROUTER: (f"{_SPARSE}.gate.weight", f"{_FUSED}.gate.weight"),
    Canon.MOE_ACT_IN: (f"{_SPARSE}.experts.{{expert}}.w1.weight",
                       SourceName(f"{_FUSED}.experts.gate_up_proj", gate_up_half(0))),
    Canon.MOE_LINEAR_IN: (f"{_SPARSE}.experts.{{expert}}.w3.weight",
                          SourceName(f"{_FUSED}.experts.gate_up_proj", gate_up_half(1))),
    Canon.MOE_OUT: (f"{_SPARSE}.experts.{{expert}}.w2.weight", f"{_FUSED}.experts.down_proj"),
}


@register("MixtralForCausalLM")
class MixtralSpec(ArchSpec):
    layout = MIXTRAL_LAYOUT
    source_names = MIXTRAL_SOURCE_NAMES
    dropped = ("model.layers.{layer}.self_attn.rotary_emb.inv_freq",)

    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        cfg = llama_like_config(self.architecture, hf, dtype, mapping, default_rope_base=1e6)
        cfg["attn_bias"] = False
        # TensorRT-LLM's MoE layer takes the gated activation's name (the plugin fuses [up; gate] in one GEMM).
        cfg["hidden_act"] = "swiglu"
        cfg["moe"] = {"num_experts": hf["num_local_experts"], "top_k": hf["num_experts_per_tok"],
                      "normalization_mode": RENORMALIZE}
        return cfg
