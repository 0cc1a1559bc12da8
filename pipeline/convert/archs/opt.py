"""OPTForCausalLM: GPT-like (LayerNorms with bias, learned positions, plain MLP, relu), with the learned position
table's offset of 2 rows dropped, `do_layer_norm_before` false meaning post-norm blocks and no final norm, and a
tied head. TensorRT-LLM's OPT has no pipeline parallelism.

Models whose word embeddings are narrower than the hidden size (`word_embed_proj_dim`, opt-350m) have bias-free
linear maps project_in (after the embedding) and project_out (after the final norm, before the head). TensorRT-LLM's
OPT has no such tensors, so, as its converter does, they are folded: vocab_embedding = embed_tokens @ project_in.T
and lm_head = head @ project_out (head = embed_tokens when tied), both (vocab, hidden), computed in float32;
parallel embedding is forced off for these models as TensorRT-LLM does."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from pipeline.checkpoint.layout import OPT_LAYOUT
from pipeline.convert.canonical import Canon
from pipeline.convert.registry import ArchSpec, MappingArgs, SourceName, checkpoint_config, register
from pipeline.errors import PipelineError

_L = "model.decoder.layers.{layer}"
POSITION_OFFSET = 2  # OPT's learned positions start at row 2 of its table


def drop_position_offset(t: torch.Tensor, cfg: Mapping[str, Any]) -> torch.Tensor:
    return t[POSITION_OFFSET:]


def fold_project_in(parts: list[torch.Tensor], cfg: Mapping[str, Any]) -> torch.Tensor:
    """embed (vocab, proj) and project_in (hidden, proj) -> the embedding as the model sees it, (vocab, hidden)."""
    embed, project_in = parts
    return embed.float() @ project_in.float().T


def fold_project_out(parts: list[torch.Tensor], cfg: Mapping[str, Any]) -> torch.Tensor:
    """head (vocab, proj) and project_out (proj, hidden) -> one head over hidden states, (vocab, hidden)."""
    head, project_out = parts
    return head.float() @ project_out.float()


_EMBED, _HEAD = "model.decoder.embed_tokens.weight", "lm_head.weight"
_PROJECT_IN, _PROJECT_OUT = "model.decoder.project_in.weight", "model.decoder.project_out.weight"


def _projects(hf: Mapping[str, Any]) -> bool:
    return hf.get("word_embed_proj_dim", hf["hidden_size"]) != hf["hidden_size"]


@register("OPTForCausalLM")
class OPTSpec(ArchSpec):
    layout = OPT_LAYOUT
    supports_pp = False
    source_names = {
        # The joined alternatives are used when the projections exist (word_embed_proj_dim != hidden_size).
        Canon.VOCAB_EMBED: (SourceName(_EMBED, joined=(_PROJECT_IN,), join=fold_project_in), _EMBED),
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
        Canon.LM_HEAD: (SourceName(_HEAD, joined=(_PROJECT_OUT,), join=fold_project_out),
                        SourceName(_EMBED, joined=(_PROJECT_OUT,), join=fold_project_out), _HEAD),
    }
    transforms = {Canon.POSITION_EMBED: drop_position_offset}

    def tied_embeddings(self, hf: Mapping[str, Any]) -> bool:
        # With projections the head differs from the embedding (each folds its own projection).
        return bool(hf.get("tie_word_embeddings", True)) and not _projects(hf)

    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
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
        if _projects(hf):  # folded projections: TensorRT-LLM's converter keeps the embedding whole
            cfg.update(use_parallel_embedding=False, embedding_sharding_dim=0)
        return cfg
