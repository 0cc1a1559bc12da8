"""BloomForCausalLM: ALiBi positions (no position table), a LayerNorm after the word embeddings, per-head interleaved
fused qkv ([q_h; k_h; v_h] rows, as GPT-NeoX), tanh-approximated GELU, biases everywhere, tied embeddings; written
as TensorRT-LLM's BloomForCausalLM (`transformer.ln_embed`, position_embedding_type `alibi`)."""

from __future__ import annotations

from typing import Any, Mapping

from pipeline.checkpoint.layout import BLOOM_LAYOUT
from pipeline.convert.archs.neox import interleaved_qkv_part
from pipeline.convert.canonical import Canon
from pipeline.convert.registry import ArchSpec, MappingArgs, checkpoint_config, register

_H = "transformer.h.{layer}"
_QKV = f"{_H}.self_attention.query_key_value"


@register("BloomForCausalLM")
class BloomSpec(ArchSpec):
    layout = BLOOM_LAYOUT
    source_names = {
        Canon.VOCAB_EMBED: "transformer.word_embeddings.weight",
        Canon.EMBED_NORM: "transformer.word_embeddings_layernorm.weight",
        Canon.EMBED_NORM_BIAS: "transformer.word_embeddings_layernorm.bias",
        Canon.ATTN_NORM: f"{_H}.input_layernorm.weight",
        Canon.ATTN_NORM_BIAS: f"{_H}.input_layernorm.bias",
        **{c: f"{_QKV}.weight" for c in (Canon.ATTN_Q, Canon.ATTN_K, Canon.ATTN_V)},
        **{c: f"{_QKV}.bias" for c in (Canon.ATTN_Q_BIAS, Canon.ATTN_K_BIAS, Canon.ATTN_V_BIAS)},
        Canon.ATTN_OUT: f"{_H}.self_attention.dense.weight",
        Canon.ATTN_OUT_BIAS: f"{_H}.self_attention.dense.bias",
        Canon.MLP_NORM: f"{_H}.post_attention_layernorm.weight",
        Canon.MLP_NORM_BIAS: f"{_H}.post_attention_layernorm.bias",
        Canon.MLP_ACT_IN: f"{_H}.mlp.dense_h_to_4h.weight",
        Canon.MLP_ACT_IN_BIAS: f"{_H}.mlp.dense_h_to_4h.bias",
        Canon.MLP_OUT: f"{_H}.mlp.dense_4h_to_h.weight",
        Canon.MLP_OUT_BIAS: f"{_H}.mlp.dense_4h_to_h.bias",
        Canon.FINAL_NORM: "transformer.ln_f.weight",
        Canon.FINAL_NORM_BIAS: "transformer.ln_f.bias",
        Canon.LM_HEAD: "lm_head.weight",
    }
    transforms = {
        **{c: interleaved_qkv_part(i) for i, c in enumerate((Canon.ATTN_Q, Canon.ATTN_K, Canon.ATTN_V))},
        **{c: interleaved_qkv_part(i) for i, c in enumerate((Canon.ATTN_Q_BIAS, Canon.ATTN_K_BIAS, Canon.ATTN_V_BIAS))},
    }

    def tied_embeddings(self, hf: Mapping[str, Any]) -> bool:
        return bool(hf.get("tie_word_embeddings", True))

    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        hidden = hf.get("hidden_size") or hf["n_embed"]
        heads = hf.get("n_head") or hf["num_attention_heads"]
        cfg = checkpoint_config(
            "BloomForCausalLM", dtype, mapping, vocab_size=hf["vocab_size"],
            max_position_embeddings=hf.get("max_position_embeddings") or 2048, hidden_size=hidden,
            num_hidden_layers=hf.get("n_layer") or hf["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=heads, head_size=hidden // heads, hidden_act="gelu_new", intermediate_size=4 * hidden,
            norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), position_embedding_type="alibi",
        )
        cfg["bias"] = True
        return cfg
