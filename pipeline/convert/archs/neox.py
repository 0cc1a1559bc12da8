"""GPTNeoXForCausalLM (Pythia, GPT-NeoX): per-head interleaved fused qkv, parallel residual with two LayerNorms,
partial rotary (`rotary_pct`), untied output embedding. TensorRT-LLM's model has no pipeline parallelism for it."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from pipeline.checkpoint.layout import NEOX_LAYOUT
from pipeline.convert.canonical import Canon, Dims
from pipeline.convert.registry import ArchSpec, MappingArgs, checkpoint_config, register
from pipeline.errors import PipelineError

_L = "gpt_neox.layers.{layer}"
_QKV = f"{_L}.attention.query_key_value"


def interleaved_qkv_part(index: int) -> Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]:
    """Rows are grouped per head as [q_h; k_h; v_h]; take part `index` of every head, heads in order."""

    def take(t: torch.Tensor, cfg: Mapping[str, Any]) -> torch.Tensor:
        d = Dims.from_config(cfg)
        per_head = t.reshape(d.heads, 3, d.head_size, *t.shape[1:])
        return per_head.select(1, index).reshape(d.heads * d.head_size, *t.shape[1:])

    take.__name__ = f"interleaved_qkv_{'qkv'[index]}"
    return take


def hf_rope(hf: Mapping[str, Any]) -> tuple[float, float]:
    """(base, rotary fraction) from either HF config style."""
    params = hf.get("rope_parameters") or {}
    base = hf.get("rotary_emb_base", hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    pct = hf.get("rotary_pct", hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)))
    return float(base), float(pct)


@register("GPTNeoXForCausalLM")
class GPTNeoXSpec(ArchSpec):
    layout = NEOX_LAYOUT
    supports_pp = False
    source_names = {
        Canon.VOCAB_EMBED: "gpt_neox.embed_in.weight",
        Canon.ATTN_NORM: f"{_L}.input_layernorm.weight",
        Canon.ATTN_NORM_BIAS: f"{_L}.input_layernorm.bias",
        Canon.MLP_NORM: f"{_L}.post_attention_layernorm.weight",
        Canon.MLP_NORM_BIAS: f"{_L}.post_attention_layernorm.bias",
        **{c: f"{_QKV}.weight" for c in (Canon.ATTN_Q, Canon.ATTN_K, Canon.ATTN_V)},
        **{c: f"{_QKV}.bias" for c in (Canon.ATTN_Q_BIAS, Canon.ATTN_K_BIAS, Canon.ATTN_V_BIAS)},
        Canon.ATTN_OUT: f"{_L}.attention.dense.weight",
        Canon.ATTN_OUT_BIAS: f"{_L}.attention.dense.bias",
        Canon.MLP_ACT_IN: f"{_L}.mlp.dense_h_to_4h.weight",
        Canon.MLP_ACT_IN_BIAS: f"{_L}.mlp.dense_h_to_4h.bias",
        Canon.MLP_OUT: f"{_L}.mlp.dense_4h_to_h.weight",
        Canon.MLP_OUT_BIAS: f"{_L}.mlp.dense_4h_to_h.bias",
        Canon.FINAL_NORM: "gpt_neox.final_layer_norm.weight",
        Canon.FINAL_NORM_BIAS: "gpt_neox.final_layer_norm.bias",
        Canon.LM_HEAD: ("embed_out.weight", "lm_head.weight"),  # the name changed between transformers versions
    }
    dropped = (f"{_L}.attention.bias", f"{_L}.attention.masked_bias", f"{_L}.attention.rotary_emb.inv_freq")
    transforms = {
        **{c: interleaved_qkv_part(i) for i, c in enumerate((Canon.ATTN_Q, Canon.ATTN_K, Canon.ATTN_V))},
        **{c: interleaved_qkv_part(i) for i, c in enumerate((Canon.ATTN_Q_BIAS, Canon.ATTN_K_BIAS, Canon.ATTN_V_BIAS))},
    }

    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        if not hf.get("use_parallel_residual", True):
            raise PipelineError("GPTNeoXForCausalLM with use_parallel_residual=false: TensorRT-LLM's GPT-NeoX always "
                                "uses the parallel residual")
        if hf.get("intermediate_size", 4 * hidden) != 4 * hidden:
            raise PipelineError(f"GPTNeoXForCausalLM: TensorRT-LLM fixes the MLP at 4 x hidden_size = {4 * hidden}, "
                                f"the model has intermediate_size={hf['intermediate_size']}")
        base, pct = hf_rope(hf)
        cfg = checkpoint_config(
            self.architecture, dtype, mapping, vocab_size=hf["vocab_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048), hidden_size=hidden,
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=heads,
            head_size=hidden // heads, hidden_act=hf.get("hidden_act", "gelu"), intermediate_size=4 * hidden,
            norm_epsilon=hf.get("layer_norm_eps", 1e-5), position_embedding_type="rope_gpt_neox",
        )
        cfg.update(rotary_emb_base=base, rotary_pct=pct)
        return cfg
