"""GPTJForCausalLM: interleaved ("GPT-J") rotary on the first `rotary_dim` dims of each head, so HF weights are used
as they are; parallel attention and MLP under one LayerNorm; MLP output bias on tp rank 0 only; lm_head bias.
TensorRT-LLM's model has no pipeline-parallel receive path for it, so pp_size must be 1."""

from __future__ import annotations

from typing import Any, Mapping

from pipeline.checkpoint.layout import GPTJ_LAYOUT
from pipeline.convert.canonical import Canon
from pipeline.convert.registry import ArchSpec, MappingArgs, checkpoint_config, register

_H = "transformer.h.{layer}"


@register("GPTJForCausalLM")
class GPTJSpec(ArchSpec):
    layout = GPTJ_LAYOUT
    supports_pp = False
    source_names = {
        Canon.VOCAB_EMBED: "transformer.wte.weight",
        Canon.ATTN_NORM: f"{_H}.ln_1.weight",
        Canon.ATTN_NORM_BIAS: f"{_H}.ln_1.bias",
        Canon.ATTN_Q: f"{_H}.attn.q_proj.weight",
        Canon.ATTN_K: f"{_H}.attn.k_proj.weight",
        Canon.ATTN_V: f"{_H}.attn.v_proj.weight",
        Canon.ATTN_OUT: f"{_H}.attn.out_proj.weight",
        Canon.MLP_ACT_IN: f"{_H}.mlp.fc_in.weight",
        Canon.MLP_ACT_IN_BIAS: f"{_H}.mlp.fc_in.bias",
        Canon.MLP_OUT: f"{_H}.mlp.fc_out.weight",
        Canon.MLP_OUT_BIAS: f"{_H}.mlp.fc_out.bias",
        Canon.FINAL_NORM: "transformer.ln_f.weight",
        Canon.FINAL_NORM_BIAS: "transformer.ln_f.bias",
        Canon.LM_HEAD: "lm_head.weight",
        Canon.LM_HEAD_BIAS: "lm_head.bias",
    }
    dropped = (f"{_H}.attn.bias", f"{_H}.attn.masked_bias")

    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        hidden, heads = hf["n_embd"], hf["n_head"]
        cfg = checkpoint_config(
            self.architecture, dtype, mapping, vocab_size=hf["vocab_size"], max_position_embeddings=hf["n_positions"],
            hidden_size=hidden, num_hidden_layers=hf["n_layer"], num_attention_heads=heads, num_key_value_heads=heads,
            head_size=hidden // heads, hidden_act=hf.get("activation_function", "gelu_new"),
            intermediate_size=hf.get("n_inner") or 4 * hidden, norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            position_embedding_type="rope_gptj",
        )
        cfg.update(rotary_dim=hf.get("rotary_dim") or hidden // heads,
                   rotary_base=float((hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
        return cfg
