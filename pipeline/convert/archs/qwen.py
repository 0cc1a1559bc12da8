"""Qwen2ForCausalLM: Llama-shaped with q/k/v biases (no o_proj bias), written as TensorRT-LLM's QWenForCausalLM
with `qwen_type: qwen2`."""

from __future__ import annotations

from typing import Any, Mapping

from pipeline.checkpoint.layout import QWEN2_LAYOUT
from pipeline.convert.archs.llama import LLAMA_SOURCE_NAMES, llama_like_config
from pipeline.convert.canonical import Canon
from pipeline.convert.registry import ArchSpec, MappingArgs, register


@register("Qwen2ForCausalLM")
class Qwen2Spec(ArchSpec):
    layout = QWEN2_LAYOUT
    source_names = {c: n for c, n in LLAMA_SOURCE_NAMES.items() if c is not Canon.ATTN_OUT_BIAS}
    dropped = ("model.layers.{layer}.self_attn.rotary_emb.inv_freq",)

    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        cfg = llama_like_config(self.architecture, hf, dtype, mapping, default_rope_base=10000.0)
        cfg["qwen_type"] = "qwen2"
        cfg["attn_bias"] = True
        if hf.get("use_sliding_window") and hf.get("sliding_window"):  # layers from max_window_layers on slide
            cfg.update(sliding_window=int(hf["sliding_window"]), max_window_layers=int(hf.get("max_window_layers") or 0))
        return cfg
