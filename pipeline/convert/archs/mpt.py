"""MptForCausalLM (transformers) and MPTForCausalLM (MosaicML's own code), written as TensorRT-LLM's
MPTForCausalLM: ALiBi positions (slopes from `alibi_bias_max`), LayerNorms without bias, a fused `Wqkv` holding
[Q; K; V] rows (K and V with `kv_n_heads` heads when grouped), a plain MLP of 4 x hidden with exact GELU, bias-free
linears, the head tied to the embedding, and `clip_qkv` (the fused projection clamped to [-clip, clip]).

What TensorRT-LLM's MPT model cannot express is refused by name instead of converted into a different function:
biases (`no_bias: false`: its model would then want an lm_head bias and no norm biases, which no MPT checkpoint
has), learned positions (`attn_config.alibi: false`), query/key LayerNorms (`qk_ln`), a `softmax_scale` other than
1/sqrt(head_size), a `logit_scale`, and an MLP ratio other than 4."""

from __future__ import annotations

import math
from typing import Any, Mapping

from pipeline.checkpoint.layout import MPT_LAYOUT
from pipeline.convert.archs.gpt import qkv_part
from pipeline.convert.canonical import Canon
from pipeline.convert.registry import ArchSpec, MappingArgs, checkpoint_config, register
from pipeline.errors import PipelineError

_B = "transformer.blocks.{layer}"
_QKV = f"{_B}.attn.Wqkv.weight"


def _attn_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    attn = hf.get("attn_config") or {}
    return dict(attn) if isinstance(attn, Mapping) else dict(vars(attn))


def check_expressible(hf: Mapping[str, Any]) -> None:
    """Refuse MPT variants TensorRT-LLM's MPTForCausalLM would compute differently, naming the config key."""
    attn = _attn_config(hf)
    head_size = hf["d_model"] // hf["n_heads"]
    problems = []
    if hf.get("no_bias", True) is False:
        problems.append("no_bias=false (linear and norm biases)")
    if attn.get("alibi", True) is False:
        problems.append("attn_config.alibi=false (learned positions)")
    if attn.get("qk_ln"):
        problems.append("attn_config.qk_ln=true")
    scale = attn.get("softmax_scale")
    if scale is not None and not math.isclose(float(scale), head_size ** -0.5, rel_tol=1e-6):
        problems.append(f"attn_config.softmax_scale={scale} (TensorRT-LLM scales by 1/sqrt({head_size}))")
    if hf.get("logit_scale") is not None:
        problems.append(f"logit_scale={hf['logit_scale']}")
    if int(hf.get("expansion_ratio", 4)) != 4:
        problems.append(f"expansion_ratio={hf['expansion_ratio']} (TensorRT-LLM's MPT MLP is 4 x d_model)")
    if problems:
        raise PipelineError(f"MPT config: {'; '.join(problems)}: TensorRT-LLM's MPTForCausalLM cannot express "
                            "this, so it is not converted")


@register("MptForCausalLM", "MPTForCausalLM")
class MptSpec(ArchSpec):
    written_name = "MPTForCausalLM"
    layout = MPT_LAYOUT
    source_names = {
        Canon.VOCAB_EMBED: "transformer.wte.weight",
        Canon.ATTN_NORM: f"{_B}.norm_1.weight",
        Canon.ATTN_Q: _QKV,
        Canon.ATTN_K: _QKV,
        Canon.ATTN_V: _QKV,
        Canon.ATTN_OUT: f"{_B}.attn.out_proj.weight",
        Canon.MLP_NORM: f"{_B}.norm_2.weight",
        Canon.MLP_ACT_IN: f"{_B}.ffn.up_proj.weight",
        Canon.MLP_OUT: f"{_B}.ffn.down_proj.weight",
        Canon.FINAL_NORM: "transformer.norm_f.weight",
        Canon.LM_HEAD: "lm_head.weight",
    }
    transforms = {Canon.ATTN_Q: qkv_part(0, False), Canon.ATTN_K: qkv_part(1, False), Canon.ATTN_V: qkv_part(2, False)}

    def tied_embeddings(self, hf: Mapping[str, Any]) -> bool:
        return bool(hf.get("tie_word_embeddings", True))

    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        check_expressible(hf)
        attn = _attn_config(hf)
        hidden, heads = hf["d_model"], hf["n_heads"]
        cfg = checkpoint_config(
            "MPTForCausalLM", dtype, mapping, vocab_size=hf["vocab_size"],
            max_position_embeddings=hf.get("max_seq_len") or 2048, hidden_size=hidden,
            num_hidden_layers=hf["n_layers"], num_attention_heads=heads,
            num_key_value_heads=attn.get("kv_n_heads") or heads, head_size=hidden // heads, hidden_act="gelu",
            intermediate_size=4 * hidden, norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            position_embedding_type="alibi",
        )
        # TensorRT-LLM's MPT fields: bias (always false here, see check_expressible), clip_qkv, alibi_bias_max.
        cfg.update(bias=False, clip_qkv=attn.get("clip_qkv"), alibi_bias_max=attn.get("alibi_bias_max", 8))
        return cfg
