"""FalconForCausalLM in its three layouts: multi-head with per-head interleaved qkv (falcon-rw), multi-query
(falcon-7b) and the new decoder architecture with KV groups (40B/180B); parallel attention with one or two
LayerNorms, or sequential blocks; biases or not; rotary or ALiBi positions (`alibi_with_scale`: the bias is scaled
by 1/sqrt(head_size) as the queries are)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from pipeline.checkpoint.layout import FALCON_LAYOUT
from pipeline.convert.canonical import Canon, Dims
from pipeline.convert.registry import ArchSpec, MappingArgs, checkpoint_config, register

_H = "transformer.h.{layer}"
_QKV = f"{_H}.self_attention.query_key_value"


def grouped_qkv_part(index: int) -> Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]:
    """All three layouts are one grouped view: (kv_heads, heads/kv_heads + 2, head_size, ...) with each group's
    query heads first, then its K, then its V (kv_heads = heads for the interleaved MHA case, 1 for multi-query)."""

    def take(t: torch.Tensor, cfg: Mapping[str, Any]) -> torch.Tensor:
        d = Dims.from_config(cfg)
        per_group = d.heads // d.kv_heads
        grouped = t.reshape(d.kv_heads, per_group + 2, d.head_size, *t.shape[1:])
        part = grouped[:, :per_group] if index == 0 else grouped[:, per_group + index - 1: per_group + index]
        return part.reshape(-1, *t.shape[1:])

    take.__name__ = f"grouped_qkv_{'qkv'[index]}"
    return take


def falcon_kv_heads(hf: Mapping[str, Any]) -> int:
    heads = hf["num_attention_heads"]
    if hf.get("new_decoder_architecture"):
        return hf.get("num_kv_heads") or heads
    return 1 if hf.get("multi_query", True) else heads


@register("FalconForCausalLM", "RWForCausalLM")
class FalconSpec(ArchSpec):
    written_name = "FalconForCausalLM"
    layout = FALCON_LAYOUT
    source_names = {
        Canon.VOCAB_EMBED: "transformer.word_embeddings.weight",
        Canon.ATTN_NORM: (f"{_H}.input_layernorm.weight", f"{_H}.ln_attn.weight"),
        Canon.ATTN_NORM_BIAS: (f"{_H}.input_layernorm.bias", f"{_H}.ln_attn.bias"),
        Canon.MLP_NORM: (f"{_H}.ln_mlp.weight", f"{_H}.post_attention_layernorm.weight"),
        Canon.MLP_NORM_BIAS: (f"{_H}.ln_mlp.bias", f"{_H}.post_attention_layernorm.bias"),
        **{c: f"{_QKV}.weight" for c in (Canon.ATTN_Q, Canon.ATTN_K, Canon.ATTN_V)},
        **{c: f"{_QKV}.bias" for c in (Canon.ATTN_Q_BIAS, Canon.ATTN_K_BIAS, Canon.ATTN_V_BIAS)},
        Canon.ATTN_OUT: f"{_H}.self_attention.dense.weight",
        Canon.ATTN_OUT_BIAS: f"{_H}.self_attention.dense.bias",
        Canon.MLP_ACT_IN: f"{_H}.mlp.dense_h_to_4h.weight",
        Canon.MLP_ACT_IN_BIAS: f"{_H}.mlp.dense_h_to_4h.bias",
        Canon.MLP_OUT: f"{_H}.mlp.dense_4h_to_h.weight",
        Canon.MLP_OUT_BIAS: f"{_H}.mlp.dense_4h_to_h.bias",
        Canon.FINAL_NORM: "transformer.ln_f.weight",
        Canon.FINAL_NORM_BIAS: "transformer.ln_f.bias",
        Canon.LM_HEAD: "lm_head.weight",
    }
    transforms = {
        **{c: grouped_qkv_part(i) for i, c in enumerate((Canon.ATTN_Q, Canon.ATTN_K, Canon.ATTN_V))},
        **{c: grouped_qkv_part(i) for i, c in enumerate((Canon.ATTN_Q_BIAS, Canon.ATTN_K_BIAS, Canon.ATTN_V_BIAS))},
    }

    def tied_embeddings(self, hf: Mapping[str, Any]) -> bool:
        return bool(hf.get("tie_word_embeddings", True))

    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        params = hf.get("rope_parameters") or {}
        cfg = checkpoint_config(
            "FalconForCausalLM", dtype, mapping, vocab_size=hf["vocab_size"],  # TensorRT-LLM's name, also for RW
            max_position_embeddings=hf.get("max_position_embeddings", 2048), hidden_size=hidden,
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=falcon_kv_heads(hf), head_size=hidden // heads, hidden_act="gelu",
            intermediate_size=hf.get("ffn_hidden_size") or 4 * hidden,
            norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            position_embedding_type="alibi_with_scale" if hf.get("alibi") else "rope_gpt_neox",
        )
        cfg.update(rotary_base=float(hf.get("rope_theta", params.get("rope_theta", 10000.0))),
                   bias=bool(hf.get("bias", False)), parallel_attention=bool(hf.get("parallel_attn", True)),
                   new_decoder_architecture=bool(hf.get("new_decoder_architecture", False)))
        if cfg["new_decoder_architecture"]:
            cfg["num_ln_in_parallel_attn"] = hf.get("num_ln_in_parallel_attn") or 2
        return cfg
