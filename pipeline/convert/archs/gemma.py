"""The Gemma family.

GemmaForCausalLM (Gemma 1): Llama-shaped with RMSNorm weights stored as offsets (the model multiplies by 1 + w, so
the converter writes 1 + w, computed in float32), head_size independent of hidden/heads, a tied head written as a
row-split copy of the embedding, and the embedding scaled by sqrt(hidden_size) inside the model (not stored).
TensorRT-LLM's Gemma always shards the embedding over tp (use_parallel_embedding is forced when tp_size > 1), and
splits the vocabulary without padding, so vocab_size must be divisible by tp_size.

Gemma2ForCausalLM adds TensorRT-LLM's `inter_layernorms`: the attention output is normed before its residual add
(HF post_attention_layernorm -> post_layernorm) and the MLP has a norm on each side (pre_/post_feedforward_layernorm,
same names), all stored as 1 + w; queries are scaled by query_pre_attn_scalar**-0.5; attention scores and final
logits may be tanh-capped; layers alternate between sliding-window and global attention. Gemma3ForCausalLM (text
only) adds per-head q/k RMSNorms (q_layernorm / k_layernorm, 1 + w) and a separate RoPE base for the sliding layers
(rope_local_base_freq), and has no attention soft-cap.

Which layers slide is written as TensorRT-LLM's `_sliding_window_pattern` p (layer i is global when (i + 1) % p == 0,
else sliding), derived from HF `layer_types`; a layer_types list no pattern describes is refused. Gemma2 carries it
and `sliding_window` too (TensorRT-LLM itself takes Gemma2's window at run time as max_attention_window_size), so the
checkpoint alone describes the model."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch

from pipeline.checkpoint.layout import GEMMA2_LAYOUT, GEMMA3_LAYOUT, LLAMA_LAYOUT
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
    inter_layernorms: ClassVar[bool] = False

    def tied_embeddings(self, hf: Mapping[str, Any]) -> bool:
        return bool(hf.get("tie_word_embeddings", True))

    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        cfg = self._base_config(hf, dtype, mapping)
        cfg.update(rope_fields(hf, 10000.0))
        return cfg

    def forced_mapping_fields(self, cfg: Mapping[str, Any], mapping: MappingArgs) -> dict[str, Any]:
        tp = mapping.tp_size
        if cfg["vocab_size"] % tp:
            raise PipelineError(f"{self.architecture}: TensorRT-LLM splits Gemma's vocabulary without padding; "
                                f"vocab_size={cfg['vocab_size']} is not divisible by tp_size={tp}")
        return {"use_parallel_embedding": tp > 1, "embedding_sharding_dim": 0}

    def _base_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        forced = self.forced_mapping_fields(hf, mapping)
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
        # Forced as TensorRT-LLM's Gemma forces it, whatever the recipe asked.
        cfg.update(attn_bias=False, mlp_bias=False, inter_layernorms=self.inter_layernorms, tie_word_embeddings=True,
                   **forced)
        return cfg


_GEMMA2_NORMS = (Canon.ATTN_NORM, Canon.ATTN_POST_NORM, Canon.MLP_NORM, Canon.MLP_POST_NORM, Canon.FINAL_NORM)
GEMMA2_SOURCE_NAMES: dict[Canon, str] = {
    **LLAMA_SOURCE_NAMES,
    Canon.ATTN_POST_NORM: "model.layers.{layer}.post_attention_layernorm.weight",
    Canon.MLP_NORM: "model.layers.{layer}.pre_feedforward_layernorm.weight",
    Canon.MLP_POST_NORM: "model.layers.{layer}.post_feedforward_layernorm.weight",
}
SLIDING, GLOBAL = "sliding_attention", "full_attention"


def sliding_window_pattern(hf: Mapping[str, Any], default: int) -> int:
    """TensorRT-LLM's `_sliding_window_pattern` for HF `layer_types` (the declared pattern when it fits)."""
    layers = hf["num_hidden_layers"]
    declared = hf.get("_sliding_window_pattern") or hf.get("sliding_window_pattern") or default
    if hf.get("sliding_window") is None:
        return 1  # every layer global
    kinds = hf.get("layer_types") or [GLOBAL if (i + 1) % declared == 0 else SLIDING for i in range(layers)]
    for p in (declared, *range(1, layers + 2)):
        if all(k == (GLOBAL if (i + 1) % p == 0 else SLIDING) for i, k in enumerate(kinds)):
            return p
    raise PipelineError(f"layer_types {kinds} follow no sliding-window pattern (every p-th layer global) that "
                        "TensorRT-LLM's Gemma can express")


class _SlidingGemmaSpec(GemmaSpec):
    layout = GEMMA2_LAYOUT
    source_names = GEMMA2_SOURCE_NAMES
    transforms = {c: plus_one for c in _GEMMA2_NORMS}
    inter_layernorms = True
    default_pattern: ClassVar[int] = 2

    def _sliding_config(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        if hf.get("use_bidirectional_attention"):
            raise PipelineError(f"{self.architecture} with use_bidirectional_attention is not a causal LM; "
                                "not supported")
        return {
            "query_pre_attn_scalar": hf.get("query_pre_attn_scalar", 256),
            "final_logit_softcapping": hf.get("final_logit_softcapping"),
            "_sliding_window_pattern": sliding_window_pattern(hf, self.default_pattern),
            "sliding_window": hf.get("sliding_window") or hf.get("max_position_embeddings", 8192),
        }


@register("Gemma2ForCausalLM")
class Gemma2Spec(_SlidingGemmaSpec):
    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        cfg = self._base_config(hf, dtype, mapping)
        cfg.update(rope_fields(hf, 10000.0))
        cfg.update(self._sliding_config(hf), attn_logit_softcapping=hf.get("attn_logit_softcapping"))
        return cfg


@register("Gemma3ForCausalLM")
class Gemma3Spec(_SlidingGemmaSpec):
    layout = GEMMA3_LAYOUT
    source_names = {
        **GEMMA2_SOURCE_NAMES,
        Canon.ATTN_Q_NORM: "model.layers.{layer}.self_attn.q_norm.weight",
        Canon.ATTN_K_NORM: "model.layers.{layer}.self_attn.k_norm.weight",
    }
    transforms = {c: plus_one for c in (*_GEMMA2_NORMS, Canon.ATTN_Q_NORM, Canon.ATTN_K_NORM)}
    default_pattern = 6

    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        cfg = self._base_config(hf, dtype, mapping)
        params = hf.get("rope_parameters") or {}
        if GLOBAL in params:  # transformers 5: one RoPE dict per layer type
            global_rope, local_rope = params[GLOBAL], params.get(SLIDING) or {}
        else:  # older configs: rope_theta / rope_scaling for global layers, rope_local_base_freq for local ones
            global_rope = {"rope_theta": hf.get("rope_theta", 1_000_000.0), **(hf.get("rope_scaling") or {})}
            local_rope = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
        if local_rope.get("rope_type", "default") != "default":
            raise PipelineError(f"Gemma3ForCausalLM: RoPE scaling on sliding layers ({local_rope}) cannot be "
                                "written (TensorRT-LLM carries only rope_local_base_freq for them)")
        cfg.update(rope_fields({"rope_parameters": global_rope}, 1_000_000.0))
        cfg.update(self._sliding_config(hf), rope_local_base_freq=float(local_rope.get("rope_theta", 10000.0)))
        return cfg
