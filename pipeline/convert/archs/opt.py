"""OPTForCausalLM: GPT-like (LayerNorms with bias, learned positions, plain MLP, relu), with the learned position
table's offset of 2 rows dropped, `do_layer_norm_before` false meaning post-norm blocks and no final norm, and a
tied head. TensorRT-LLM's OPT has no pipeline parallelism."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from pipeline.checkpoint.layout import OPT_LAYOUT
from pipeline.convert.canonical import Canon
from pipeline.convert.registry import ArchSpec, MappingArgs, checkpoint_config, register
from pipeline.errors import PipelineError

_L = "model.decoder.layers.{layer}"
POSITION_OFFSET = 2  # OPT's learned positions start at row 2 of its table


def drop_position_offset(t: torch.Tensor, cfg: Mapping[str, Any]) -> torch.Tensor:
    return t[POSITION_OFFSET:]


@register("OPTForCausalLM")
class OPTSpec(ArchSpec):
    layout = OPT_LAYOUT
    supports_pp = False
    source_names = {
        Canon.VOCAB_EMBED: "model.decoder.embed_tokens.weight",
        Canon.POSITION_EMBED: "model.decoder.embed_positions.weight",
        Canon.ATTN_NORM: f"{_L}.self_attn_layer_norm.weight",
        Canon.ATTN_NORM_BIAS: f"{_L}.self_attn_layer_norm.bias",
        **{c: f"{_L}.self_attn.{n}_proj.{kind}"
           for kind, parts in (("weight", (Canon.ATTN_Q, Canon.ATTN_K, Canon.ATTN_V)),
                               ("bias", (Canon.ATTN_Q_BIAS, Canon.ATTN_K_BIAS, Canon.ATTN_V_BIAS)))
           for n, c in zip("qkv", parts)},
        Canon.ATTN_OUT: f"{_L}.self_attn.out_proj.weight",
        Canon.ATTN_OUT_BIAS: f"{_L}.self_attn.out_proj.bias",
        Canon.MLP_NORM: f"{_L}.final_layer_norm.weight",
        Canon.MLP_NORM_BIAS: f"{_L}.final_layer_norm.bias",
        Canon.MLP_ACT_IN: f"{_L}.fc1.weight",
        Canon.MLP_ACT_IN_BIAS: f"{_L}.fc1.bias",
        Canon.MLP_OUT: f"{_L}.fc2.weight",
        Canon.MLP_OUT_BIAS: f"{_L}.fc2.bias",
        Canon.FINAL_NORM: "model.decoder.final_layer_norm.weight",
        Canon.FINAL_NORM_BIAS: "model.decoder.final_layer_norm.bias",
        Canon.LM_HEAD: "lm_head.weight",
    }
    transforms = {Canon.POSITION_EMBED: drop_position_offset}

    def tied_embeddings(self, hf: Mapping[str, Any]) -> bool:
        return bool(hf.get("tie_word_embeddings", True))

    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("word_embed_proj_dim", hidden) != hidden:
            raise PipelineError(f"OPTForCausalLM with word_embed_proj_dim={hf['word_embed_proj_dim']} != "
                                f"hidden_size={hidden} (project_in/project_out, e.g. opt-350m) is not supported yet")
        if not hf.get("enable_bias", True) or not hf.get("layer_norm_elementwise_affine", True):
            raise PipelineError("OPTForCausalLM without biases or without LayerNorm affine weights is not supported")
        cfg = checkpoint_config(
            self.architecture, dtype, mapping, vocab_size=hf["vocab_size"],
            max_position_embeddings=hf["max_position_embeddings"], hidden_size=hidden,
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=heads,
            head_size=hidden // heads, hidden_act=hf.get("activation_function", "relu"), intermediate_size=hf["ffn_dim"],
            norm_epsilon=1e-5, position_embedding_type="learned_absolute",
        )
        cfg["do_layer_norm_before"] = bool(hf.get("do_layer_norm_before", True))
        return cfg
