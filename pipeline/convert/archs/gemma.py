"""GemmaForCausalLM (Gemma 1): Llama-shaped with RMSNorm weights stored as offsets (the model multiplies by 1 + w,
so the converter writes 1 + w, computed in float32), head_size independent of hidden/heads, a tied head written as a
row-split copy of the embedding, and the embedding scaled by sqrt(hidden_size) inside the model (not stored).
TensorRT-LLM's Gemma always shards the embedding over tp (use_parallel_embedding is forced when tp_size > 1), and
splits the vocabulary without padding, so vocab_size must be divisible by tp_size."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from pipeline.checkpoint.layout import LLAMA_LAYOUT
from pipeline.convert.archs.llama import LLAMA_SOURCE_NAMES, rope_fields
from pipeline.convert.canonical import Canon
from pipeline.convert.registry import ArchSpec, MappingArgs, checkpoint_config, register
from pipeline.errors import PipelineError


def plus_one(t: torch.Tensor, cfg: Mapping[str, Any]) -> torch.Tensor:
    """Gemma's RMSNorm computes x_normed * (1 + w): store 1 + w (in float32, then the target dtype)."""
    return t.float() + 1.0


@register("GemmaForCausalLM")
class GemmaSpec(ArchSpec):
    layout = LLAMA_LAYOUT
    source_names = LLAMA_SOURCE_NAMES
    dropped = ("model.layers.{layer}.self_attn.rotary_emb.inv_freq",)
    transforms = {c: plus_one for c in (Canon.ATTN_NORM, Canon.MLP_NORM, Canon.FINAL_NORM)}

    def tied_embeddings(self, hf: Mapping[str, Any]) -> bool:
        return bool(hf.get("tie_word_embeddings", True))

    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        tp = mapping.tp_size
        if hf["vocab_size"] % tp:
            raise PipelineError(f"GemmaForCausalLM: TensorRT-LLM splits Gemma's vocabulary without padding; "
                                f"vocab_size={hf['vocab_size']} is not divisible by tp_size={tp}")
        heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
        cfg = checkpoint_config(
            self.architecture, dtype, mapping, vocab_size=hf["vocab_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 8192), hidden_size=hidden,
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads, head_size=hf.get("head_dim") or hidden // heads,
            hidden_act=hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh"),
            intermediate_size=hf["intermediate_size"], norm_epsilon=hf.get("rms_norm_eps", 1e-6),
            position_embedding_type="rope_gpt_neox",
        )
        cfg.update(rope_fields(hf, 10000.0))
        # Forced as TensorRT-LLM's Gemma forces it, whatever the recipe asked.
        cfg.update(attn_bias=False, mlp_bias=False, inter_layernorms=False, use_parallel_embedding=tp > 1,
                   embedding_sharding_dim=0, tie_word_embeddings=True)
        return cfg
