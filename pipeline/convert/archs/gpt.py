"""GPT-2 (GPT2LMHeadModel) and GPT-BigCode (GPTBigCodeForCausalLM, starcoder), written as TensorRT-LLM's
GPTForCausalLM with `gpt_variant` gpt2 / starcoder.

GPT-2 stores its linears as Conv1D, (in, out): every weight is transposed to (out, in). Its fused `c_attn` holds
[Q; K; V] along the output axis; each canonical part is a named slice of it. GPT-BigCode uses nn.Linear (no
transpose) and, with `multi_query`, one KV head: `c_attn` rows are [Q (H); K (D); V (D)].
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from pipeline.checkpoint.layout import GPT_LAYOUT
from pipeline.convert.canonical import Canon, Dims
from pipeline.convert.registry import ArchSpec, MappingArgs, checkpoint_config, register

_H = "transformer.h.{layer}"

GPT_SOURCE_NAMES: dict[Canon, str] = {
    Canon.VOCAB_EMBED: "transformer.wte.weight",
    Canon.POSITION_EMBED: "transformer.wpe.weight",
    Canon.ATTN_NORM: f"{_H}.ln_1.weight",
    Canon.ATTN_NORM_BIAS: f"{_H}.ln_1.bias",
    Canon.ATTN_Q: f"{_H}.attn.c_attn.weight",
    Canon.ATTN_K: f"{_H}.attn.c_attn.weight",
    Canon.ATTN_V: f"{_H}.attn.c_attn.weight",
    Canon.ATTN_Q_BIAS: f"{_H}.attn.c_attn.bias",
    Canon.ATTN_K_BIAS: f"{_H}.attn.c_attn.bias",
    Canon.ATTN_V_BIAS: f"{_H}.attn.c_attn.bias",
    Canon.ATTN_OUT: f"{_H}.attn.c_proj.weight",
    Canon.ATTN_OUT_BIAS: f"{_H}.attn.c_proj.bias",
    Canon.MLP_NORM: f"{_H}.ln_2.weight",
    Canon.MLP_NORM_BIAS: f"{_H}.ln_2.bias",
    Canon.MLP_ACT_IN: f"{_H}.mlp.c_fc.weight",
    Canon.MLP_ACT_IN_BIAS: f"{_H}.mlp.c_fc.bias",
    Canon.MLP_OUT: f"{_H}.mlp.c_proj.weight",
    Canon.MLP_OUT_BIAS: f"{_H}.mlp.c_proj.bias",
    Canon.FINAL_NORM: "transformer.ln_f.weight",
    Canon.FINAL_NORM_BIAS: "transformer.ln_f.bias",
    Canon.LM_HEAD: "lm_head.weight",
}

Transform = Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]


def conv1d_to_linear(t: torch.Tensor, cfg: Mapping[str, Any]) -> torch.Tensor:
    """Conv1D weights are (in, out); TensorRT-LLM wants (out, in)."""
    return t.transpose(0, 1)


def qkv_part(index: int, transposed: bool) -> Transform:
    """Slice part `index` (0 = Q, 1 = K, 2 = V) out of a fused [Q; K; V] weight or bias."""

    def take(t: torch.Tensor, cfg: Mapping[str, Any]) -> torch.Tensor:
        if transposed and t.dim() == 2:
            t = t.transpose(0, 1)
        d = Dims.from_config(cfg)
        sizes = [d.heads * d.head_size, d.kv_heads * d.head_size, d.kv_heads * d.head_size]
        return t.narrow(0, sum(sizes[:index]), sizes[index])

    take.__name__ = f"qkv_part_{'qkv'[index]}"
    return take


def gpt_transforms(transposed: bool) -> dict[Canon, Transform]:
    parts = {Canon.ATTN_Q: 0, Canon.ATTN_K: 1, Canon.ATTN_V: 2, Canon.ATTN_Q_BIAS: 0, Canon.ATTN_K_BIAS: 1,
             Canon.ATTN_V_BIAS: 2}
    transforms: dict[Canon, Transform] = {c: qkv_part(i, transposed) for c, i in parts.items()}
    if transposed:
        transforms.update({c: conv1d_to_linear for c in (Canon.ATTN_OUT, Canon.MLP_ACT_IN, Canon.MLP_OUT)})
    return transforms


def gpt_config(hf: Mapping[str, Any], dtype: str, mapping: MappingArgs, variant: str, kv_heads: int) -> dict[str, Any]:
    hidden, heads = hf["n_embd"], hf["n_head"]
    cfg = checkpoint_config(
        "GPTForCausalLM", dtype, mapping, vocab_size=hf["vocab_size"], max_position_embeddings=hf["n_positions"],
        hidden_size=hidden, num_hidden_layers=hf["n_layer"], num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_size=hidden // heads, hidden_act=hf.get("activation_function", "gelu_new"),
        intermediate_size=hf.get("n_inner") or 4 * hidden, norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        # GPT-2 itself has learned positions; Megatron-family GPT sources may say "alibi" (no position table).
        position_embedding_type=hf.get("position_embedding_type", "learned_absolute"),
    )
    cfg.update(gpt_variant=variant, bias=True)
    return cfg


@register("GPT2LMHeadModel")
class GPT2Spec(ArchSpec):
    written_name = "GPTForCausalLM"
    layout = GPT_LAYOUT
    source_names = GPT_SOURCE_NAMES
    dropped = ("transformer.h.{layer}.attn.bias", "transformer.h.{layer}.attn.masked_bias")
    transforms = gpt_transforms(transposed=True)

    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        return gpt_config(hf, dtype, mapping, "gpt2", hf["n_head"])

    def tied_embeddings(self, hf: Mapping[str, Any]) -> bool:
        return bool(hf.get("tie_word_embeddings", True))


@register("GPTBigCodeForCausalLM")
class GPTBigCodeSpec(GPT2Spec):
    transforms = gpt_transforms(transposed=False)

    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        return gpt_config(hf, dtype, mapping, "starcoder", 1 if hf.get("multi_query", True) else hf["n_head"])
