"""PhiForCausalLM (phi-2): separate q/k/v with biases, one LayerNorm shared by parallel attention and MLP, partial
rotary, lm_head with a bias. TensorRT-LLM's model has no pipeline parallelism for it."""

from __future__ import annotations

from typing import Any, Mapping

from pipeline.checkpoint.layout import PHI_LAYOUT
from pipeline.convert.archs.neox import hf_rope
from pipeline.convert.canonical import Canon
from pipeline.convert.registry import ArchSpec, MappingArgs, checkpoint_config, register
from pipeline.errors import PipelineError

_L = "model.layers.{layer}"


@register("PhiForCausalLM")
class PhiSpec(ArchSpec):
    layout = PHI_LAYOUT
    supports_pp = False
    source_names = {
        Canon.VOCAB_EMBED: "model.embed_tokens.weight",
        Canon.ATTN_NORM: f"{_L}.input_layernorm.weight",
        Canon.ATTN_NORM_BIAS: f"{_L}.input_layernorm.bias",
        **{c: f"{_L}.self_attn.{n}_proj.{kind}"
           for kind, parts in (("weight", (Canon.ATTN_Q, Canon.ATTN_K, Canon.ATTN_V)),
                               ("bias", (Canon.ATTN_Q_BIAS, Canon.ATTN_K_BIAS, Canon.ATTN_V_BIAS)))
           for n, c in zip("qkv", parts)},
        Canon.ATTN_OUT: f"{_L}.self_attn.dense.weight",
        Canon.ATTN_OUT_BIAS: f"{_L}.self_attn.dense.bias",
        Canon.MLP_ACT_IN: f"{_L}.mlp.fc1.weight",
        Canon.MLP_ACT_IN_BIAS: f"{_L}.mlp.fc1.bias",
        Canon.MLP_OUT: f"{_L}.mlp.fc2.weight",
        Canon.MLP_OUT_BIAS: f"{_L}.mlp.fc2.bias",
        Canon.FINAL_NORM: "model.final_layernorm.weight",
        Canon.FINAL_NORM_BIAS: "model.final_layernorm.bias",
        Canon.LM_HEAD: "lm_head.weight",
        Canon.LM_HEAD_BIAS: "lm_head.bias",
    }
    dropped = (f"{_L}.self_attn.rotary_emb.inv_freq",)

    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        if hf.get("qk_layernorm"):
            raise PipelineError("PhiForCausalLM with qk_layernorm=true is not supported")
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        base, pct = hf_rope(hf)
        cfg = checkpoint_config(
            self.architecture, dtype, mapping, vocab_size=hf["vocab_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048), hidden_size=hidden,
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads, head_size=hidden // heads,
            hidden_act=hf.get("hidden_act", "gelu_new"), intermediate_size=hf["intermediate_size"],
            norm_epsilon=hf.get("layer_norm_eps", 1e-5), position_embedding_type="rope_gpt_neox",
        )
        cfg.update(rotary_base=base, rotary_pct=pct)
        return cfg
