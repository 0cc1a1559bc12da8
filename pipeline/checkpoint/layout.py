"""Which tensors each rank file of a TensorRT-LLM checkpoint holds, by name, shape, dtype and origin.

A layout is data: a tuple of `Target` rows, each naming the TensorRT-LLM tensor (with `{layer}` = the *local* layer
index on its pipeline stage), the canonical parts it is fused from, the split rule, where it lives (first stage,
every layer, last stage) and the config condition under which the model declares it. `plan()` expands a layout for a
checkpoint config into the exact per-rank tensor list; the converter writes that list and the validator checks
existing checkpoints against it, so both sides share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from pipeline.checkpoint.sharding import ShardContext, Split, moe_parallel, shard
from pipeline.convert.canonical import Canon, Dims, canonical_shape
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.quantize.schemes import QTensor, Scheme, Settings


class Place(str, Enum):
    FIRST_STAGE = "first_stage"  # only on pp rank 0 (embeddings)
    LAYER = "layer"  # once per decoder layer of the stage
    LAST_STAGE = "last_stage"  # only on the last pp rank (ln_f, lm_head)


Predicate = Callable[[Mapping[str, Any]], bool]


def always(_: Mapping[str, Any]) -> bool:
    return True


def flag(key: str, default: bool = False) -> Predicate:
    """A predicate that reads a boolean checkpoint-config field."""

    def check(cfg: Mapping[str, Any]) -> bool:
        return bool(cfg.get(key, default))

    check.__name__ = f"flag({key})"
    return check


@dataclass(frozen=True)
class Target:
    name: str
    parts: tuple[Canon, ...]
    split: Split
    place: Place = Place.LAYER
    present: Predicate = always
    quant: "QTensor | None" = None  # a tensor computed from calibration statistics (KV-cache scales)
    dtype: str | None = None  # stored in this dtype whatever the checkpoint's (the MoE router: float32)


def _layer(name: str) -> str:
    return f"transformer.layers.{{layer}}.{name}"


# TensorRT-LLM's LLaMAForCausalLM (Llama, Mistral, InternLM, ...): RMSNorm, fused QKV, gated MLP.
LLAMA_LAYOUT: tuple[Target, ...] = (
    Target("transformer.vocab_embedding.weight", (Canon.VOCAB_EMBED,), Split.EMBEDDING, Place.FIRST_STAGE),
    Target(_layer("input_layernorm.weight"), (Canon.ATTN_NORM,), Split.REPLICATE),
    Target(_layer("attention.qkv.weight"), (Canon.ATTN_Q, Canon.ATTN_K, Canon.ATTN_V), Split.QKV_HEADS),
    Target(
        _layer("attention.qkv.bias"),
        (Canon.ATTN_Q_BIAS, Canon.ATTN_K_BIAS, Canon.ATTN_V_BIAS),
        Split.QKV_HEADS,
        present=flag("attn_bias"),
    ),
    Target(_layer("attention.dense.weight"), (Canon.ATTN_OUT,), Split.ROW),
    # Row-parallel biases are added after the all-reduce: every rank holds the full bias.
    Target(_layer("attention.dense.bias"), (Canon.ATTN_OUT_BIAS,), Split.REPLICATE, present=flag("attn_bias")),
    Target(_layer("post_layernorm.weight"), (Canon.MLP_NORM,), Split.REPLICATE),
    # TensorRT-LLM gated MLP: proj(act(fc(x)) * gate(x)); fc is the activated branch.
    Target(_layer("mlp.fc.weight"), (Canon.MLP_ACT_IN,), Split.COLUMN),
    Target(_layer("mlp.fc.bias"), (Canon.MLP_ACT_IN_BIAS,), Split.COLUMN, present=flag("mlp_bias")),
    Target(_layer("mlp.gate.weight"), (Canon.MLP_LINEAR_IN,), Split.COLUMN),
    Target(_layer("mlp.gate.bias"), (Canon.MLP_LINEAR_IN_BIAS,), Split.COLUMN, present=flag("mlp_bias")),
    Target(_layer("mlp.proj.weight"), (Canon.MLP_OUT,), Split.ROW),
    Target(_layer("mlp.proj.bias"), (Canon.MLP_OUT_BIAS,), Split.REPLICATE, present=flag("mlp_bias")),
    Target("transformer.ln_f.weight", (Canon.FINAL_NORM,), Split.REPLICATE, Place.LAST_STAGE),
    Target("lm_head.weight", (Canon.LM_HEAD,), Split.VOCAB, Place.LAST_STAGE),
)


# TensorRT-LLM's GemmaForCausalLM with inter_layernorms (Gemma2): no biases; the attention output is normed
# (post_layernorm) before its residual add, and the MLP has a norm on each side (pre_/post_feedforward_layernorm).
_GEMMA2_HEAD = (
    Target("transformer.vocab_embedding.weight", (Canon.VOCAB_EMBED,), Split.EMBEDDING, Place.FIRST_STAGE),
    Target(_layer("input_layernorm.weight"), (Canon.ATTN_NORM,), Split.REPLICATE),
    Target(_layer("attention.qkv.weight"), (Canon.ATTN_Q, Canon.ATTN_K, Canon.ATTN_V), Split.QKV_HEADS),
)
_GEMMA2_TAIL = (
    Target(_layer("attention.dense.weight"), (Canon.ATTN_OUT,), Split.ROW),
    Target(_layer("post_layernorm.weight"), (Canon.ATTN_POST_NORM,), Split.REPLICATE),
    Target(_layer("pre_feedforward_layernorm.weight"), (Canon.MLP_NORM,), Split.REPLICATE),
    Target(_layer("post_feedforward_layernorm.weight"), (Canon.MLP_POST_NORM,), Split.REPLICATE),
    Target(_layer("mlp.fc.weight"), (Canon.MLP_ACT_IN,), Split.COLUMN),
    Target(_layer("mlp.gate.weight"), (Canon.MLP_LINEAR_IN,), Split.COLUMN),
    Target(_layer("mlp.proj.weight"), (Canon.MLP_OUT,), Split.ROW),
    Target("transformer.ln_f.weight", (Canon.FINAL_NORM,), Split.REPLICATE, Place.LAST_STAGE),
    Target("lm_head.weight", (Canon.LM_HEAD,), Split.VOCAB, Place.LAST_STAGE),
)
GEMMA2_LAYOUT: tuple[Target, ...] = _GEMMA2_HEAD + _GEMMA2_TAIL
# Gemma3: Gemma2's layer plus per-head RMSNorms of q and k (replicated, head_size long).
GEMMA3_LAYOUT: tuple[Target, ...] = (
    *_GEMMA2_HEAD,
    Target(_layer("attention.q_layernorm.weight"), (Canon.ATTN_Q_NORM,), Split.REPLICATE),
    Target(_layer("attention.k_layernorm.weight"), (Canon.ATTN_K_NORM,), Split.REPLICATE),
    *_GEMMA2_TAIL,
)


def _without_dense_bias(layout: tuple[Target, ...]) -> tuple[Target, ...]:
    return tuple(t for t in layout if t.name != _layer("attention.dense.bias"))


# TensorRT-LLM's Phi3ForCausalLM: Llama's names, but one fused gated `mlp.fc` = [up (linear); gate (activated)]
# (hidden_act swiglu: silu on the second half), each tp rank holding its slice of each half, and no `mlp.gate`.
PHI3_LAYOUT: tuple[Target, ...] = tuple(
    Target(t.name, (Canon.MLP_LINEAR_IN, Canon.MLP_ACT_IN), Split.COLUMN) if t.name == _layer("mlp.fc.weight") else t
    for t in LLAMA_LAYOUT
    if not t.name.startswith(_layer("mlp.gate")) and t.name != _layer("mlp.fc.bias")
)


# TensorRT-LLM's QWenForCausalLM for qwen2: like Llama, but attn_bias covers q/k/v only (o_proj has no bias).
QWEN2_LAYOUT: tuple[Target, ...] = _without_dense_bias(LLAMA_LAYOUT)


# TensorRT-LLM's LLaMAForCausalLM with a MoE MLP (Mixtral): the router (float32, replicated, never quantized) and
# the experts stacked: fc = [w3 (linear); w1 (activated)] per expert -> (E, 2I, H), proj -> (E, H, I). moe_ep gives
# each rank whole experts, moe_tp splits each expert's I (each fc half separately).
MIXTRAL_LAYOUT: tuple[Target, ...] = (
    *(t for t in LLAMA_LAYOUT if ".mlp." not in t.name),
    Target(_layer("mlp.router.weight"), (Canon.MOE_ROUTER,), Split.REPLICATE, dtype="float32"),
    Target(_layer("mlp.fc.weight"), (Canon.MOE_LINEAR_IN, Canon.MOE_ACT_IN), Split.EXPERT_COLUMN),
    Target(_layer("mlp.proj.weight"), (Canon.MOE_OUT,), Split.EXPERT_ROW),
)


# TensorRT-LLM's GPTForCausalLM (GPT-2, GPT-BigCode/starcoder): LayerNorm with bias, learned absolute positions,
# plain MLP fc -> act -> proj, biases on every linear when `bias` (default true); lm_head has no bias.
_BIAS = flag("bias", True)
GPT_LAYOUT: tuple[Target, ...] = (
    Target("transformer.vocab_embedding.weight", (Canon.VOCAB_EMBED,), Split.EMBEDDING, Place.FIRST_STAGE),
    # Sharded exactly like the vocabulary embedding when use_parallel_embedding (rows padded for dim 0).
    Target("transformer.position_embedding.weight", (Canon.POSITION_EMBED,), Split.EMBEDDING, Place.FIRST_STAGE,
           present=lambda cfg: cfg.get("position_embedding_type", "learned_absolute") == "learned_absolute"),
    Target(_layer("input_layernorm.weight"), (Canon.ATTN_NORM,), Split.REPLICATE),
    Target(_layer("input_layernorm.bias"), (Canon.ATTN_NORM_BIAS,), Split.REPLICATE),
    Target(_layer("attention.qkv.weight"), (Canon.ATTN_Q, Canon.ATTN_K, Canon.ATTN_V), Split.QKV_HEADS),
    Target(_layer("attention.qkv.bias"), (Canon.ATTN_Q_BIAS, Canon.ATTN_K_BIAS, Canon.ATTN_V_BIAS), Split.QKV_HEADS,
           present=_BIAS),
    Target(_layer("attention.dense.weight"), (Canon.ATTN_OUT,), Split.ROW),
    Target(_layer("attention.dense.bias"), (Canon.ATTN_OUT_BIAS,), Split.REPLICATE, present=_BIAS),
    Target(_layer("post_layernorm.weight"), (Canon.MLP_NORM,), Split.REPLICATE),
    Target(_layer("post_layernorm.bias"), (Canon.MLP_NORM_BIAS,), Split.REPLICATE),
    Target(_layer("mlp.fc.weight"), (Canon.MLP_ACT_IN,), Split.COLUMN),
    Target(_layer("mlp.fc.bias"), (Canon.MLP_ACT_IN_BIAS,), Split.COLUMN, present=_BIAS),
    Target(_layer("mlp.proj.weight"), (Canon.MLP_OUT,), Split.ROW),
    Target(_layer("mlp.proj.bias"), (Canon.MLP_OUT_BIAS,), Split.REPLICATE, present=_BIAS),
    Target("transformer.ln_f.weight", (Canon.FINAL_NORM,), Split.REPLICATE, Place.LAST_STAGE),
    Target("transformer.ln_f.bias", (Canon.FINAL_NORM_BIAS,), Split.REPLICATE, Place.LAST_STAGE),
    Target("lm_head.weight", (Canon.LM_HEAD,), Split.VOCAB, Place.LAST_STAGE),
)


# TensorRT-LLM's BloomForCausalLM: GPT's block without position embeddings (ALiBi), a LayerNorm after the embedding
# (`transformer.ln_embed`), biases everywhere.
BLOOM_LAYOUT: tuple[Target, ...] = (
    GPT_LAYOUT[0],
    Target("transformer.ln_embed.weight", (Canon.EMBED_NORM,), Split.REPLICATE, Place.FIRST_STAGE),
    Target("transformer.ln_embed.bias", (Canon.EMBED_NORM_BIAS,), Split.REPLICATE, Place.FIRST_STAGE),
    *(t for t in GPT_LAYOUT[2:]),
)


# TensorRT-LLM's MPTForCausalLM: LayerNorms without bias (input_layernorm, post_layernorm, ln_f), fused qkv, plain
# MLP fc -> gelu -> proj, ALiBi (no position table), bias-free linears (the only form TensorRT-LLM's MPT conversion
# writes), lm_head tied to the embedding (written whole).
MPT_LAYOUT: tuple[Target, ...] = (
    GPT_LAYOUT[0],
    Target(_layer("input_layernorm.weight"), (Canon.ATTN_NORM,), Split.REPLICATE),
    Target(_layer("attention.qkv.weight"), (Canon.ATTN_Q, Canon.ATTN_K, Canon.ATTN_V), Split.QKV_HEADS),
    Target(_layer("attention.dense.weight"), (Canon.ATTN_OUT,), Split.ROW),
    Target(_layer("post_layernorm.weight"), (Canon.MLP_NORM,), Split.REPLICATE),
    Target(_layer("mlp.fc.weight"), (Canon.MLP_ACT_IN,), Split.COLUMN),
    Target(_layer("mlp.proj.weight"), (Canon.MLP_OUT,), Split.ROW),
    Target("transformer.ln_f.weight", (Canon.FINAL_NORM,), Split.REPLICATE, Place.LAST_STAGE),
    Target("lm_head.weight", (Canon.LM_HEAD,), Split.VOCAB, Place.LAST_STAGE),
)


def _with_bias(weight: str, canon: Canon, split: Split) -> tuple[Target, Target]:
    bias_canon = Canon(canon.value.replace(".weight", ".bias"))
    return (Target(_layer(f"{weight}.weight"), (canon,), split),
            Target(_layer(f"{weight}.bias"), (bias_canon,), Split.REPLICATE if split is Split.ROW else split))


# TensorRT-LLM's GPTNeoXForCausalLM: LayerNorms with bias (the second one named post_attention_layernorm), parallel
# residual, biases on every linear, no lm_head bias.
NEOX_LAYOUT: tuple[Target, ...] = (
    Target("transformer.vocab_embedding.weight", (Canon.VOCAB_EMBED,), Split.EMBEDDING, Place.FIRST_STAGE),
    Target(_layer("input_layernorm.weight"), (Canon.ATTN_NORM,), Split.REPLICATE),
    Target(_layer("input_layernorm.bias"), (Canon.ATTN_NORM_BIAS,), Split.REPLICATE),
    Target(_layer("post_attention_layernorm.weight"), (Canon.MLP_NORM,), Split.REPLICATE),
    Target(_layer("post_attention_layernorm.bias"), (Canon.MLP_NORM_BIAS,), Split.REPLICATE),
    Target(_layer("attention.qkv.weight"), (Canon.ATTN_Q, Canon.ATTN_K, Canon.ATTN_V), Split.QKV_HEADS),
    Target(_layer("attention.qkv.bias"), (Canon.ATTN_Q_BIAS, Canon.ATTN_K_BIAS, Canon.ATTN_V_BIAS), Split.QKV_HEADS),
    *_with_bias("attention.dense", Canon.ATTN_OUT, Split.ROW),
    *_with_bias("mlp.fc", Canon.MLP_ACT_IN, Split.COLUMN),
    *_with_bias("mlp.proj", Canon.MLP_OUT, Split.ROW),
    Target("transformer.ln_f.weight", (Canon.FINAL_NORM,), Split.REPLICATE, Place.LAST_STAGE),
    Target("transformer.ln_f.bias", (Canon.FINAL_NORM_BIAS,), Split.REPLICATE, Place.LAST_STAGE),
    Target("lm_head.weight", (Canon.LM_HEAD,), Split.VOCAB, Place.LAST_STAGE),
)

# TensorRT-LLM's PhiForCausalLM (phi-2): one LayerNorm shared by parallel attention and MLP, biases everywhere,
# lm_head with a bias (padded and split like its rows).
PHI_LAYOUT: tuple[Target, ...] = (
    Target("transformer.vocab_embedding.weight", (Canon.VOCAB_EMBED,), Split.EMBEDDING, Place.FIRST_STAGE),
    Target(_layer("input_layernorm.weight"), (Canon.ATTN_NORM,), Split.REPLICATE),
    Target(_layer("input_layernorm.bias"), (Canon.ATTN_NORM_BIAS,), Split.REPLICATE),
    Target(_layer("attention.qkv.weight"), (Canon.ATTN_Q, Canon.ATTN_K, Canon.ATTN_V), Split.QKV_HEADS),
    Target(_layer("attention.qkv.bias"), (Canon.ATTN_Q_BIAS, Canon.ATTN_K_BIAS, Canon.ATTN_V_BIAS), Split.QKV_HEADS),
    *_with_bias("attention.dense", Canon.ATTN_OUT, Split.ROW),
    *_with_bias("mlp.fc", Canon.MLP_ACT_IN, Split.COLUMN),
    *_with_bias("mlp.proj", Canon.MLP_OUT, Split.ROW),
    Target("transformer.ln_f.weight", (Canon.FINAL_NORM,), Split.REPLICATE, Place.LAST_STAGE),
    Target("transformer.ln_f.bias", (Canon.FINAL_NORM_BIAS,), Split.REPLICATE, Place.LAST_STAGE),
    Target("lm_head.weight", (Canon.LM_HEAD,), Split.VOCAB, Place.LAST_STAGE),
    Target("lm_head.bias", (Canon.LM_HEAD_BIAS,), Split.VOCAB, Place.LAST_STAGE),
)


# TensorRT-LLM's GPTJForCausalLM: one LayerNorm shared by parallel attention and MLP, no attention biases, MLP biases
# with the output bias on tp rank 0 only (attention and MLP are summed before a single all-reduce), lm_head bias.
GPTJ_LAYOUT: tuple[Target, ...] = (
    Target("transformer.vocab_embedding.weight", (Canon.VOCAB_EMBED,), Split.EMBEDDING, Place.FIRST_STAGE),
    Target(_layer("input_layernorm.weight"), (Canon.ATTN_NORM,), Split.REPLICATE),
    Target(_layer("input_layernorm.bias"), (Canon.ATTN_NORM_BIAS,), Split.REPLICATE),
    Target(_layer("attention.qkv.weight"), (Canon.ATTN_Q, Canon.ATTN_K, Canon.ATTN_V), Split.QKV_HEADS),
    Target(_layer("attention.dense.weight"), (Canon.ATTN_OUT,), Split.ROW),
    *_with_bias("mlp.fc", Canon.MLP_ACT_IN, Split.COLUMN),
    Target(_layer("mlp.proj.weight"), (Canon.MLP_OUT,), Split.ROW),
    Target(_layer("mlp.proj.bias"), (Canon.MLP_OUT_BIAS,), Split.RANK0),
    Target("transformer.ln_f.weight", (Canon.FINAL_NORM,), Split.REPLICATE, Place.LAST_STAGE),
    Target("transformer.ln_f.bias", (Canon.FINAL_NORM_BIAS,), Split.REPLICATE, Place.LAST_STAGE),
    Target("lm_head.weight", (Canon.LM_HEAD,), Split.VOCAB, Place.LAST_STAGE),
    Target("lm_head.bias", (Canon.LM_HEAD_BIAS,), Split.VOCAB, Place.LAST_STAGE),
)


# TensorRT-LLM's OPTForCausalLM: GPT's layout, with ln_f only when do_layer_norm_before (post-norm OPT has none).
OPT_LAYOUT: tuple[Target, ...] = tuple(
    Target(t.name, t.parts, t.split, t.place, flag("do_layer_norm_before")) if t.name.startswith("transformer.ln_f")
    else t
    for t in GPT_LAYOUT
)


def _falcon_two_norms(cfg: Mapping[str, Any]) -> bool:
    return bool(cfg.get("new_decoder_architecture")) and (cfg.get("num_ln_in_parallel_attn") or 2) == 2


def _falcon_sequential(cfg: Mapping[str, Any]) -> bool:
    return not cfg.get("new_decoder_architecture") and not cfg.get("parallel_attention")


# TensorRT-LLM's FalconForCausalLM: the MLP's norm is `mlp_layernorm` (new architecture with two norms),
# `post_layernorm` (sequential models such as falcon-rw), or absent (one norm shared by parallel attention and MLP).
_FALCON_BIAS = flag("bias", False)
FALCON_LAYOUT: tuple[Target, ...] = (
    Target("transformer.vocab_embedding.weight", (Canon.VOCAB_EMBED,), Split.EMBEDDING, Place.FIRST_STAGE),
    Target(_layer("input_layernorm.weight"), (Canon.ATTN_NORM,), Split.REPLICATE),
    Target(_layer("input_layernorm.bias"), (Canon.ATTN_NORM_BIAS,), Split.REPLICATE),
    Target(_layer("mlp_layernorm.weight"), (Canon.MLP_NORM,), Split.REPLICATE, present=_falcon_two_norms),
    Target(_layer("mlp_layernorm.bias"), (Canon.MLP_NORM_BIAS,), Split.REPLICATE, present=_falcon_two_norms),
    Target(_layer("post_layernorm.weight"), (Canon.MLP_NORM,), Split.REPLICATE, present=_falcon_sequential),
    Target(_layer("post_layernorm.bias"), (Canon.MLP_NORM_BIAS,), Split.REPLICATE, present=_falcon_sequential),
    Target(_layer("attention.qkv.weight"), (Canon.ATTN_Q, Canon.ATTN_K, Canon.ATTN_V), Split.QKV_HEADS),
    Target(_layer("attention.qkv.bias"), (Canon.ATTN_Q_BIAS, Canon.ATTN_K_BIAS, Canon.ATTN_V_BIAS), Split.QKV_HEADS,
           present=_FALCON_BIAS),
    Target(_layer("attention.dense.weight"), (Canon.ATTN_OUT,), Split.ROW),
    Target(_layer("attention.dense.bias"), (Canon.ATTN_OUT_BIAS,), Split.REPLICATE, present=_FALCON_BIAS),
    Target(_layer("mlp.fc.weight"), (Canon.MLP_ACT_IN,), Split.COLUMN),
    Target(_layer("mlp.fc.bias"), (Canon.MLP_ACT_IN_BIAS,), Split.COLUMN, present=_FALCON_BIAS),
    Target(_layer("mlp.proj.weight"), (Canon.MLP_OUT,), Split.ROW),
    Target(_layer("mlp.proj.bias"), (Canon.MLP_OUT_BIAS,), Split.REPLICATE, present=_FALCON_BIAS),
    Target("transformer.ln_f.weight", (Canon.FINAL_NORM,), Split.REPLICATE, Place.LAST_STAGE),
    Target("transformer.ln_f.bias", (Canon.FINAL_NORM_BIAS,), Split.REPLICATE, Place.LAST_STAGE),
    Target("lm_head.weight", (Canon.LM_HEAD,), Split.VOCAB, Place.LAST_STAGE),
)


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of one rank file."""

    name: str  # TensorRT-LLM name with the local layer index
    canons: tuple[Canon, ...]  # canonical parts, in fuse order
    layer: int | None  # global layer index of per-layer tensors
    split: Split
    shape: tuple[int, ...]
    dtype: torch.dtype
    # Quantized tensors: which one of the scheme's tensors this is, and the linear module it belongs to.
    quant: "QTensor | None" = None
    module: str | None = None

    @property
    def parts(self) -> tuple[str, ...]:
        """Concrete canonical names of the parts."""
        return tuple(c.at(self.layer) for c in self.canons)


@dataclass(frozen=True)
class RankPlan:
    rank: int
    tp_rank: int
    pp_rank: int
    layers: range  # global layer indices held by this rank's pipeline stage
    tensors: tuple[PlannedTensor, ...]


def pp_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Global layer indices of one pipeline stage (torch.tensor_split semantics: the first L mod P stages get one
    more layer), as TensorRT-LLM's Mapping.pp_layers assigns them."""
    if pp_size > num_layers:
        raise PipelineError(f"mapping.pp_size={pp_size} exceeds num_hidden_layers={num_layers}")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_fits(cfg: Mapping[str, Any]) -> None:
    """Reject mappings the model cannot be split into, before any tensor is read."""
    ctx = ShardContext.from_config(cfg)
    dims = Dims.from_config(cfg)
    tp, pp = cfg["mapping"]["tp_size"], cfg["mapping"]["pp_size"]
    problems = []
    if dims.heads % tp:
        problems.append(f"num_attention_heads={dims.heads} is not divisible by tp_size={tp}")
    if dims.kv_heads % tp and tp % dims.kv_heads:
        problems.append(
            f"num_key_value_heads={dims.kv_heads} must divide or be divisible by tp_size={tp} "
            "(KV heads are split, or duplicated when tp_size exceeds them)"
        )
    if dims.experts:
        moe_tp, moe_ep = moe_parallel(cfg["mapping"])
        if moe_tp * moe_ep != tp:
            problems.append(f"moe_tp_size={moe_tp} x moe_ep_size={moe_ep} does not equal tp_size={tp}")
        if dims.experts % moe_ep:
            problems.append(f"num_experts={dims.experts} is not divisible by moe_ep_size={moe_ep}")
        if dims.intermediate % moe_tp:
            problems.append(f"intermediate_size={dims.intermediate} is not divisible by moe_tp_size={moe_tp}")
    elif dims.intermediate % tp:
        problems.append(f"intermediate_size={dims.intermediate} is not divisible by tp_size={tp}")
    if ctx.use_parallel_embedding and ctx.embedding_sharding_dim == 1 and dims.hidden % tp:
        problems.append(f"hidden_size={dims.hidden} is not divisible by tp_size={tp} (embedding_sharding_dim=1)")
    if pp > dims.layers:
        problems.append(f"pp_size={pp} exceeds num_hidden_layers={dims.layers}")
    if problems:
        raise PipelineError("the model does not fit the mapping: " + "; ".join(problems))


def plan(cfg: Mapping[str, Any], layout: tuple[Target, ...]) -> list[RankPlan]:
    """Every rank's tensors, in file order, with shapes computed by the real split rules on meta tensors."""
    check_fits(cfg)
    mapping = cfg["mapping"]
    tp, pp = mapping["tp_size"], mapping["pp_size"]
    dims = Dims.from_config(cfg)
    ctx = ShardContext.from_config(cfg)
    dtype = DTYPES[cfg["dtype"]]
    targets = [t for t in layout if t.present(cfg)] + _kv_scale_targets(cfg)
    quant = _quantization(cfg, dtype)
    if quant is not None:
        _check_group_sizes(targets, dims, ctx, quant, pp)
    plans = []
    for pp_rank in range(pp):
        layers = pp_layers(dims.layers, pp, pp_rank)
        for tp_rank in range(tp):
            tensors = []
            for target, local, layer in _instances(targets, layers, pp_rank, pp):
                name = target.name.format(layer=local)
                tensors.extend(_planned(target, name, layer, dims, ctx, tp_rank, dtype, quant))
            plans.append(RankPlan(pp_rank * tp + tp_rank, tp_rank, pp_rank, layers, tuple(tensors)))
    return sorted(plans, key=lambda p: p.rank)


def _quantization(cfg: Mapping[str, Any], dtype: torch.dtype) -> "tuple[Scheme, Settings, list | None] | None":
    """The weight-quantization scheme of the config, when it writes quantized tensors into the checkpoint."""
    q = cfg.get("quantization") or {}
    if not q.get("quant_algo"):
        return None
    from pipeline.quantize.schemes import Settings, get_scheme

    scheme = get_scheme(q["quant_algo"])
    if not scheme.tensors:
        return None
    settings = Settings(dtype=dtype, group_size=int(q.get("group_size") or 128),
                        smoothquant_val=float(q.get("smoothquant_val", 0.5)))
    return scheme, settings, q.get("exclude_modules")


def _kv_scale_targets(cfg: Mapping[str, Any]) -> list[Target]:
    if not (cfg.get("quantization") or {}).get("kv_cache_quant_algo"):
        return []
    from pipeline.quantize.schemes import KV_SCALE

    return [Target(_layer("attention.kv_cache_scaling_factor"), (), Split.REPLICATE, quant=KV_SCALE)]


def _planned(target: Target, name: str, layer: int | None, dims: Dims, ctx: ShardContext, tp_rank: int,
             dtype: torch.dtype, quant) -> list[PlannedTensor]:
    """The planned tensor(s) of one target instance: itself, or the scheme's tensors replacing a linear weight."""
    if target.quant is not None:  # a scale computed from statistics, identical on every rank
        return [PlannedTensor(name, (), layer, Split.REPLICATE, (1,), torch.float32, target.quant,
                              name.rsplit(".", 1)[0])]
    shapes = [canonical_shape(c, dims) for c in target.parts]
    module = _quantized_module(name, quant)
    if module is None:
        meta = [torch.empty(s, device="meta") for s in shapes]
        shape = tuple(shard(meta, target.split, tp_rank, ctx, name).shape)
        return [PlannedTensor(name, target.parts, layer, target.split, shape,
                              DTYPES[target.dtype] if target.dtype else dtype)]
    scheme, settings, _ = quant
    if any(len(s) != 2 for s in shapes):
        raise PipelineError(f"{name}: quantization.quant_algo={scheme.algo} of {len(shapes[0])}-D weights (MoE "
                            "experts) is not supported; exclude the module with quantization.exclude_modules")
    _check_quantizable(name, scheme, settings, target.split, shapes, ctx)
    planned = []
    for qt in scheme.tensors:
        whole = _derived_whole(qt, shapes, settings)
        split = qt.split(target.split, whole[0].dim())
        piece = shard(whole, split, tp_rank, ctx, f"{module}.{qt.suffix}")
        piece = qt.finalize(piece, settings) if qt.finalize else piece
        planned.append(PlannedTensor(f"{module}.{qt.suffix}", target.parts, layer, split, tuple(piece.shape),
                                     piece.dtype, qt, module))
    return planned


def _quantized_module(name: str, quant) -> str | None:
    if quant is None:
        return None
    from pipeline.quantize.schemes import quantized_linear

    return quantized_linear(name, quant[2])


def _derived_whole(qt: "QTensor", shapes: list[tuple[int, ...]], settings: "Settings") -> list[torch.Tensor]:
    """Meta whole tensors of a scheme tensor, one per part (parts' (out, in) shapes) for ROWS tensors."""
    from pipeline.quantize.schemes import Kind

    inp = shapes[0][1]
    dt = qt.torch_dtype(settings)
    if qt.kind is Kind.ROWS:
        return [torch.empty(qt.shape(out, inp, settings), dtype=dt, device="meta") for out, _ in shapes]
    return [torch.empty(qt.shape(0, inp, settings), dtype=dt, device="meta")]


def _check_quantizable(name: str, scheme, settings, split: Split, shapes, ctx: ShardContext) -> None:
    """Group-wise schemes need every rank's input width to be a whole number of groups."""
    if not scheme.grouped:
        return
    inp = shapes[0][1]
    local = inp // ctx.tp_size if split is Split.ROW else inp
    if settings.group_size < 1:
        raise PipelineError(f"quantization.group_size={settings.group_size} must be a positive number of input "
                            f"channels, e.g. {_fitting_group(inp, local)}")
    if inp % settings.group_size or local % settings.group_size:
        fits = _fitting_group(inp, local)
        hint = (f"quantization.group_size={fits} would work" if fits else
                "no group size TensorRT-LLM's kernels take (128, 64, 32) divides it; exclude the module with "
                "quantization.exclude_modules")
        raise PipelineError(
            f"{name}: quantization.group_size={settings.group_size} does not divide the input width each rank "
            f"holds ({local} of {inp} with tp_size={ctx.tp_size}); {hint}")


def _check_group_sizes(targets: list[Target], dims: Dims, ctx: ShardContext, quant, pp: int) -> None:
    """All quantized linears at once: the first whose per-rank input width the group size does not divide is named,
    with the group size that would fit every one of them (not just that one)."""
    scheme, settings, _ = quant
    if not scheme.grouped or settings.group_size < 1:
        return
    widths: list[tuple[str, int, int]] = []
    for target, local_layer, _ in _instances(targets, range(min(1, dims.layers)), 0, 1):
        name = target.name.format(layer=local_layer)
        if target.quant is not None or _quantized_module(name, quant) is None:
            continue
        shapes = [canonical_shape(c, dims) for c in target.parts]
        if any(len(s) != 2 for s in shapes):
            continue
        inp = shapes[0][1]
        widths.append((name, inp, inp // ctx.tp_size if target.split is Split.ROW else inp))
    bad = [(n, i, loc) for n, i, loc in widths if i % settings.group_size or loc % settings.group_size]
    if not bad:
        return
    name, inp, local = bad[0]
    fits = next((g for g in (128, 64, 32) if all(i % g == 0 and loc % g == 0 for _, i, loc in widths)), None)
    hint = (f"quantization.group_size={fits} would work for every quantized layer" if fits else
            "no group size TensorRT-LLM's kernels take (128, 64, 32) divides every layer's width; exclude the "
            "others with quantization.exclude_modules")
    others = f" (and {len(bad) - 1} more layer kind(s))" if len(bad) > 1 else ""
    raise PipelineError(
        f"{name}: quantization.group_size={settings.group_size} does not divide the input width each rank holds "
        f"({local} of {inp} with tp_size={ctx.tp_size}){others}; {hint}")


def _fitting_group(inp: int, local: int) -> int | None:
    """The largest group size TensorRT-LLM's group-wise kernels take that divides both widths."""
    return next((g for g in (128, 64, 32) if inp % g == 0 and local % g == 0), None)


def _instances(targets: list[Target], layers: range, pp_rank: int, pp: int):
    """(target, local layer, global layer) in file order: first-stage tensors, layers, last-stage tensors."""
    if pp_rank == 0:
        yield from ((t, None, None) for t in targets if t.place is Place.FIRST_STAGE)
    for local, layer in enumerate(layers):
        yield from ((t, local, layer) for t in targets if t.place is Place.LAYER)
    if pp_rank == pp - 1:
        yield from ((t, None, None) for t in targets if t.place is Place.LAST_STAGE)
