"""Architecture registry: HF `architectures[0]` strings -> ArchSpec, one module per family, imported lazily.

An ArchSpec is mostly data: the TensorRT-LLM layout it writes, the source name template of each canonical tensor,
names it drops on purpose, and named transforms for odd reshapes. Its one piece of code maps the HF config onto the
TensorRT-LLM config fields.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch

from pipeline.checkpoint.layout import Target
from pipeline.convert.canonical import Canon
from pipeline.errors import PipelineError

# Architecture string -> module that registers it. Modules are imported only when their architecture is asked for.
ARCH_MODULES: dict[str, str] = {
    "LlamaForCausalLM": "pipeline.convert.archs.llama",
    "MistralForCausalLM": "pipeline.convert.archs.llama",
    "Qwen2ForCausalLM": "pipeline.convert.archs.qwen",
    "GPT2LMHeadModel": "pipeline.convert.archs.gpt",
    "GPTBigCodeForCausalLM": "pipeline.convert.archs.gpt",
    "GPTNeoXForCausalLM": "pipeline.convert.archs.neox",
    "PhiForCausalLM": "pipeline.convert.archs.phi",
    "BloomForCausalLM": "pipeline.convert.archs.bloom",
    "Phi3ForCausalLM": "pipeline.convert.archs.phi3",
    "GPTJForCausalLM": "pipeline.convert.archs.gptj",
    "GemmaForCausalLM": "pipeline.convert.archs.gemma",
    "Gemma2ForCausalLM": "pipeline.convert.archs.gemma",
    "Gemma3ForCausalLM": "pipeline.convert.archs.gemma",
    "OPTForCausalLM": "pipeline.convert.archs.opt",
    "FalconForCausalLM": "pipeline.convert.archs.falcon",
    "RWForCausalLM": "pipeline.convert.archs.falcon",
    "MixtralForCausalLM": "pipeline.convert.archs.mixtral",
    "MptForCausalLM": "pipeline.convert.archs.mpt",
    "MPTForCausalLM": "pipeline.convert.archs.mpt",
}

# TensorRT-LLM architecture names that differ from every source name -> a source architecture with the same
# layout (checkpoint validation looks specs up by the name written in config.json).
WRITTEN_ALIASES = {"GPTForCausalLM": "GPT2LMHeadModel"}

_REGISTRY: dict[str, "ArchSpec"] = {}


Transform = Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class SourceName:
    """A source name template with its own transform, for one alternative of a canonical tensor's sources (e.g. one
    half of a fused tensor that newer libraries save, next to the separate tensors older checkpoints hold)."""

    template: str
    transform: Transform | None = None
    # Further source tensors this one is combined with by `join` ([this, *joined] -> one tensor, before the
    # transform): e.g. a linear projection folded into an embedding. All must be present for the alternative.
    joined: tuple[str, ...] = ()
    join: Callable[[list[torch.Tensor], Mapping[str, Any]], torch.Tensor] | None = None


@dataclass(frozen=True)
class MappingArgs:
    """The mapping options the converter writes into a checkpoint config."""

    tp_size: int = 1
    pp_size: int = 1
    use_parallel_embedding: bool = False
    embedding_sharding_dim: int = 0
    # MoE parallelism inside the tp group (moe_tp_size * moe_ep_size = tp_size); None = derived as TensorRT-LLM
    # derives it (both None: moe_tp_size = tp_size, moe_ep_size = 1).
    moe_tp_size: int | None = None
    moe_ep_size: int | None = None

    def as_config(self) -> dict[str, int]:
        # Only the keys every TensorRT-LLM release knows (Mapping.from_dict raises on unknown keys); the MoE sizes
        # only when they differ from what a mapping without them means (moe_tp = tp, moe_ep = 1), since only
        # releases with expert parallelism know them.
        cfg = {"world_size": self.tp_size * self.pp_size, "tp_size": self.tp_size, "pp_size": self.pp_size}
        moe_tp, moe_ep = self.moe_sizes()
        if (moe_tp, moe_ep) != (self.tp_size, 1):
            cfg.update(moe_tp_size=moe_tp, moe_ep_size=moe_ep)
        return cfg

    def moe_sizes(self) -> tuple[int, int]:
        """(moe_tp_size, moe_ep_size), derived where not given; their product must be tp_size."""
        from pipeline.checkpoint.sharding import moe_parallel

        tp = self.tp_size
        if any(x is not None and x < 1 for x in (self.moe_tp_size, self.moe_ep_size)):
            moe_tp, moe_ep = 0, 0
        else:  # None is TensorRT-LLM's -1: derived from the other
            moe_tp, moe_ep = moe_parallel({"tp_size": tp, "moe_tp_size": self.moe_tp_size or -1,
                                           "moe_ep_size": self.moe_ep_size or -1})
        if moe_tp < 1 or moe_ep < 1 or moe_tp * moe_ep != tp:
            raise PipelineError(
                f"mapping: moe_tp_size x moe_ep_size must equal tp_size={tp} (got moe_tp_size={self.moe_tp_size}, "
                f"moe_ep_size={self.moe_ep_size})")
        return moe_tp, moe_ep


@dataclass(frozen=True)
class ArchSpec:
    """Conversion rules of one architecture family."""

    layout: ClassVar[tuple[Target, ...]]
    # Canonical tensor -> source name template ({layer} = global layer index), or a tuple of alternatives (the
    # first one present is used, e.g. a name that changed between library versions). A template with `{expert}`
    # names one expert's matrix of a canonical tensor with an expert dimension: the converter stacks experts
    # 0..E-1. A SourceName alternative carries its own transform instead of the canonical tensor's.
    source_names: ClassVar[Mapping[Canon, str | SourceName | tuple[str | SourceName, ...]]]
    # Source names (templates) that exist in checkpoints but carry nothing the target needs.
    dropped: ClassVar[tuple[str, ...]] = ()
    # Named transforms applied to a canonical tensor after reading (odd reshapes, offsets).
    transforms: ClassVar[Mapping[Canon, Transform]] = {}

    # TensorRT-LLM's model has no pipeline-parallel send/receive path for this family: refuse pp_size > 1.
    supports_pp: ClassVar[bool] = True
    # The `architecture` written into config.json when TensorRT-LLM names the family differently.
    written_name: ClassVar[str | None] = None

    architecture: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def writes_as(self) -> str:
        return self.written_name or self.architecture

    def trtllm_config(self, hf: Mapping[str, Any], dtype: str, mapping: MappingArgs) -> dict[str, Any]:
        raise NotImplementedError

    def forced_mapping_fields(self, cfg: Mapping[str, Any], mapping: MappingArgs) -> dict[str, Any]:
        """Config fields this family sets from the mapping whatever the recipe asked (for retargeting an existing
        checkpoint to a new mapping: the same fields `trtllm_config` would force)."""
        return {}

    def tied_embeddings(self, hf: Mapping[str, Any]) -> bool:
        """Whether the LM head is the input embedding (then it is read from VOCAB_EMBED)."""
        return bool(hf.get("tie_word_embeddings", False))


def checkpoint_config(architecture: str, dtype: str, mapping: MappingArgs, *, vocab_size: int,
                      max_position_embeddings: int, hidden_size: int, num_hidden_layers: int,
                      num_attention_heads: int, num_key_value_heads: int, head_size: int, hidden_act: str,
                      intermediate_size: int, norm_epsilon: float, position_embedding_type: str) -> dict[str, Any]:
    """The base fields every TensorRT-LLM checkpoint config carries; families add their own fields to it."""
    return {
        "architecture": architecture,
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_size": head_size,
        "hidden_act": hidden_act,
        "intermediate_size": intermediate_size,
        "norm_epsilon": norm_epsilon,
        "position_embedding_type": position_embedding_type,
        "mapping": mapping.as_config(),
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        "use_parallel_embedding": mapping.use_parallel_embedding,
        "embedding_sharding_dim": mapping.embedding_sharding_dim,
    }


def register(*architectures: str):
    """Class decorator: register an ArchSpec subclass under one or more HF architecture strings."""

    def deco(cls: type[ArchSpec]) -> type[ArchSpec]:
        for arch in architectures:
            _REGISTRY[arch] = cls(architecture=arch)
        return cls

    return deco


def get_spec(architecture: str) -> ArchSpec:
    architecture = WRITTEN_ALIASES.get(architecture, architecture)
    if architecture not in ARCH_MODULES:
        raise PipelineError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(sorted(ARCH_MODULES))} "
            "(set model.architecture to override what config.json says)"
        )
    importlib.import_module(ARCH_MODULES[architecture])
    return _REGISTRY[architecture]


def supported_architectures() -> list[str]:
    return sorted(ARCH_MODULES)
