"""The canonical tensor vocabulary between sources and the TensorRT-LLM writer.

Sources (HF, GGUF, ...) map their names into these logical tensors; the writer maps them out to TensorRT-LLM names
(`pipeline.checkpoint.layout`). A canonical tensor is always whole (never sharded), uses global layer indices and the
`nn.Linear` (out_features, in_features) orientation. Adding a source architecture never touches the writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Mapping


class Canon(str, Enum):
    """Logical tensors. `{layer}` is the global decoder-layer index. Comments name the archs that use each."""

    VOCAB_EMBED = "vocab_embed.weight"  # all
    POSITION_EMBED = "position_embed.weight"  # learned absolute positions (GPT-2, OPT)
    EMBED_NORM = "embed_norm.weight"  # LayerNorm right after the embedding (BLOOM)
    EMBED_NORM_BIAS = "embed_norm.bias"
    ATTN_NORM = "layers.{layer}.attn_norm.weight"  # all
    ATTN_NORM_BIAS = "layers.{layer}.attn_norm.bias"  # LayerNorm models
    ATTN_Q = "layers.{layer}.attn.q.weight"  # all
    ATTN_K = "layers.{layer}.attn.k.weight"
    ATTN_V = "layers.{layer}.attn.v.weight"
    ATTN_Q_BIAS = "layers.{layer}.attn.q.bias"  # Qwen2, Llama with attention_bias
    ATTN_K_BIAS = "layers.{layer}.attn.k.bias"
    ATTN_V_BIAS = "layers.{layer}.attn.v.bias"
    ATTN_OUT = "layers.{layer}.attn.out.weight"  # all
    ATTN_OUT_BIAS = "layers.{layer}.attn.out.bias"  # Llama with attention_bias
    ATTN_Q_NORM = "layers.{layer}.attn.q_norm.weight"  # per-head RMSNorm of queries (Gemma3)
    ATTN_K_NORM = "layers.{layer}.attn.k_norm.weight"  # per-head RMSNorm of keys (Gemma3)
    ATTN_POST_NORM = "layers.{layer}.attn_post_norm.weight"  # norm of the attention output (Gemma2/3)
    MLP_NORM = "layers.{layer}.mlp_norm.weight"  # all
    MLP_NORM_BIAS = "layers.{layer}.mlp_norm.bias"
    MLP_POST_NORM = "layers.{layer}.mlp_post_norm.weight"  # norm of the MLP output (Gemma2/3)
    # The branch that goes through the activation (HF gate_proj for SwiGLU; the only input matrix of plain MLPs).
    MLP_ACT_IN = "layers.{layer}.mlp.act_in.weight"
    MLP_ACT_IN_BIAS = "layers.{layer}.mlp.act_in.bias"
    # The linear branch multiplied with the activated one in gated MLPs (HF up_proj).
    MLP_LINEAR_IN = "layers.{layer}.mlp.linear_in.weight"
    MLP_LINEAR_IN_BIAS = "layers.{layer}.mlp.linear_in.bias"
    MLP_OUT = "layers.{layer}.mlp.out.weight"  # all (HF down_proj)
    MLP_OUT_BIAS = "layers.{layer}.mlp.out.bias"
    # Mixture of experts (Mixtral): the router, and expert weights stacked over a leading expert dimension. A source
    # template with `{expert}` names one expert's matrix; the converter stacks the experts while reading.
    MOE_ROUTER = "layers.{layer}.moe.router.weight"  # (E, H)
    MOE_ACT_IN = "layers.{layer}.moe.act_in.weight"  # (E, I, H): the activated branch (HF w1 / gate)
    MOE_LINEAR_IN = "layers.{layer}.moe.linear_in.weight"  # (E, I, H): the linear branch (HF w3 / up)
    MOE_OUT = "layers.{layer}.moe.out.weight"  # (E, H, I) (HF w2 / down)
    FINAL_NORM = "final_norm.weight"  # all
    FINAL_NORM_BIAS = "final_norm.bias"
    LM_HEAD = "lm_head.weight"  # all (tied archs read it from VOCAB_EMBED)
    LM_HEAD_BIAS = "lm_head.bias"

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.value

    def at(self, layer: int | None = None) -> str:
        """The concrete canonical name (layer filled in for per-layer tensors)."""
        return self.value.format(layer=layer) if self.per_layer else self.value


@dataclass(frozen=True)
class Dims:
    """Model dimensions read from a TensorRT-LLM checkpoint config."""

    hidden: int
    heads: int
    kv_heads: int
    head_size: int
    intermediate: int
    vocab: int
    layers: int
    max_positions: int
    experts: int = 0  # experts per MoE layer (0: dense)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Dims":
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        return cls(
            hidden=hidden,
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_size=cfg.get("head_size") or hidden // heads,
            intermediate=cfg.get("intermediate_size") or 4 * hidden,
            vocab=cfg["vocab_size"],
            layers=cfg["num_hidden_layers"],
            max_positions=cfg.get("max_position_embeddings") or 2048,
            experts=int((cfg.get("moe") or {}).get("num_experts") or 0),
        )


def _q_rows(d: Dims) -> int:
    return d.heads * d.head_size


def _kv_rows(d: Dims) -> int:
    return d.kv_heads * d.head_size


# Full (unsharded) shape of every canonical tensor, from the model dimensions.
CANONICAL_SHAPES: dict[Canon, Callable[[Dims], tuple[int, ...]]] = {
    Canon.VOCAB_EMBED: lambda d: (d.vocab, d.hidden),
    Canon.POSITION_EMBED: lambda d: (d.max_positions, d.hidden),
    Canon.EMBED_NORM: lambda d: (d.hidden,),
    Canon.EMBED_NORM_BIAS: lambda d: (d.hidden,),
    Canon.ATTN_NORM: lambda d: (d.hidden,),
    Canon.ATTN_NORM_BIAS: lambda d: (d.hidden,),
    Canon.ATTN_Q: lambda d: (_q_rows(d), d.hidden),
    Canon.ATTN_K: lambda d: (_kv_rows(d), d.hidden),
    Canon.ATTN_V: lambda d: (_kv_rows(d), d.hidden),
    Canon.ATTN_Q_BIAS: lambda d: (_q_rows(d),),
    Canon.ATTN_K_BIAS: lambda d: (_kv_rows(d),),
    Canon.ATTN_V_BIAS: lambda d: (_kv_rows(d),),
    Canon.ATTN_OUT: lambda d: (d.hidden, _q_rows(d)),
    Canon.ATTN_OUT_BIAS: lambda d: (d.hidden,),
    Canon.ATTN_Q_NORM: lambda d: (d.head_size,),
    Canon.ATTN_K_NORM: lambda d: (d.head_size,),
    Canon.ATTN_POST_NORM: lambda d: (d.hidden,),
    Canon.MLP_NORM: lambda d: (d.hidden,),
    Canon.MLP_NORM_BIAS: lambda d: (d.hidden,),
    Canon.MLP_POST_NORM: lambda d: (d.hidden,),
    Canon.MLP_ACT_IN: lambda d: (d.intermediate, d.hidden),
    Canon.MLP_ACT_IN_BIAS: lambda d: (d.intermediate,),
    Canon.MLP_LINEAR_IN: lambda d: (d.intermediate, d.hidden),
    Canon.MLP_LINEAR_IN_BIAS: lambda d: (d.intermediate,),
    Canon.MLP_OUT: lambda d: (d.hidden, d.intermediate),
    Canon.MLP_OUT_BIAS: lambda d: (d.hidden,),
    Canon.MOE_ROUTER: lambda d: (d.experts, d.hidden),
    Canon.MOE_ACT_IN: lambda d: (d.experts, d.intermediate, d.hidden),
    Canon.MOE_LINEAR_IN: lambda d: (d.experts, d.intermediate, d.hidden),
    Canon.MOE_OUT: lambda d: (d.experts, d.hidden, d.intermediate),
    Canon.FINAL_NORM: lambda d: (d.hidden,),
    Canon.FINAL_NORM_BIAS: lambda d: (d.hidden,),
    Canon.LM_HEAD: lambda d: (d.vocab, d.hidden),
    Canon.LM_HEAD_BIAS: lambda d: (d.vocab,),
}


def canonical_shape(canon: Canon, dims: Dims) -> tuple[int, ...]:
    return CANONICAL_SHAPES[canon](dims)
