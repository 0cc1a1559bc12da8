"""Llama family: LlamaForCausalLM and the Llama-shaped MistralForCausalLM (HF `model.*` naming).

HF Llama q/k rows are already in the rotate-half (NeoX) layout TensorRT-LLM's `rope_gpt_neox` expects, so no
permutation happens here (GGUF files carry llama.cpp's permutation, which the GGUF source undoes).
"""

from __future__ import annotations

from typing import Any, Mapping

from pipeline.checkpoint.layout import LLAMA_LAYOUT
from pipeline.convert.canonical import Canon
from pipeline.convert.registry import ArchSpec, MappingArgs, checkpoint_config, register

_ATTN = "model.layers.{layer}.self_attn"
_MLP = "model.layers.{layer}.mlp"

LLAMA_SOURCE_NAMES: dict[Canon, str] = {
    Canon.VOCAB_EMBED: "model.embed_tokens.weight",
    Canon.ATTN_NORM: "model.layers.{layer}.input_layernorm.weight",
    Canon.ATTN_Q: f"{_ATTN}.q_proj.weight",
    Canon.ATTN_K: f"{_ATTN}.k_proj.weight",
    Canon.ATTN_V: f"{_ATTN}.v_proj.weight",
    Canon.ATTN_Q_BIAS: f"{_ATTN}.q_proj.bias",
    Canon.ATTN_K_BIAS: f"{_ATTN}.k_proj.bias",
    Canon.ATTN_V_BIAS: f"{_ATTN}.v_proj.bias",
    Canon.ATTN_OUT: f"{_ATTN}.o_proj.weight",
    Canon.ATTN_OUT_BIAS: f"{_ATTN}.o_proj.bias",
    Canon.MLP_NORM: "model.layers.{layer}.post_attention_layernorm.weight",
    Canon.MLP_ACT_IN: f"{_MLP}.gate_proj.weight",
    Canon.MLP_ACT_IN_BIAS: f"{_MLP}.gate_proj.bias",
    Canon.MLP_LINEAR_IN: f"{_MLP}.up_proj.weight",
    Canon.MLP_LINEAR_IN_BIAS: f"{_MLP}.up_proj.bias",
    Canon.MLP_OUT: f"{_MLP}.down_proj.weight",
    Canon.MLP_OUT_BIAS: f"{_MLP}.down_proj.bias",
    Canon.FINAL_NORM: "model.norm.weight",
    Canon.LM_HEAD: "lm_head.weight",
}


def rope_fields(hf: Mapping[str, Any], default_base: float) -> dict[str, Any]:
    """`rotary_base` and `rotary_scaling` from either HF config style (`rope_theta`/`rope_scaling`, or the newer
    `rope_parameters` dict)."""
    params = dict(hf.get("rope_parameters") or {})
    base = hf.get("rope_theta", params.get("rope_theta", default_base))
    scaling = hf.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            scaling = None
        elif "original_max_position_embeddings" not in scaling and hf.get("original_max_position_embeddings"):
            scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]  # Phi-3 keeps it outside
    return {"rotary_base": float(base), "rotary_scaling": scaling}


def llama_like_config(
    arch: str, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs, default_rope_base: float
) -> dict[str, Any]:
    """TensorRT-LLM config fields shared by LLaMAConfig and QWenConfig."""
    heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    cfg = checkpoint_config(
        arch, dtype, mapping, vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048), hidden_size=hidden,
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads, head_size=hf.get("head_dim") or hidden // heads,
        hidden_act=hf.get("hidden_act", "silu"), intermediate_size=hf["intermediate_size"],
        norm_epsilon=hf.get("rms_norm_eps", 1e-6), position_embedding_type="rope_gpt_neox",
    )
    cfg.update(rope_fields(hf, default_rope_base))
    cfg["mlp_bias"] = bool(hf.get("mlp_bias", False))
    cfg["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", False))
    return cfg


@register("LlamaForCausalLM", "MistralForCausalLM")
class LlamaSpec(ArchSpec):
    layout = LLAMA_LAYOUT
    source_names = LLAMA_SOURCE_NAMES
    dropped = ("model.layers.{layer}.self_attn.rotary_emb.inv_freq",)

    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        cfg = llama_like_config(self.architecture, hf, dtype, mapping, default_rope_base=10000.0)
        cfg["attn_bias"] = bool(hf.get("attention_bias", hf.get("bias", False)))
        if hf.get("sliding_window"):  # Mistral: every layer attends to the last sliding_window positions
            cfg["sliding_window"] = int(hf["sliding_window"])
        return cfg
