"""The `cpu` backend: each rank's checkpoint file becomes `rank{N}.engine`, a safetensors file whose tensors are the
runtime module's parameters, laid out as its kernels want them (MLP fc and gate fused into one matrix), and whose
metadata holds everything the runtime needs to build the model: the engine file is self-contained."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open

from pipeline import __version__
from pipeline.checkpoint.layout import pp_layers
from pipeline.checkpoint.sharding import moe_parallel
from pipeline.checkpoint.safetensors_stream import TORCH_DTYPES, StreamingSafetensorsWriter
from pipeline.checkpoint.validate import validate_checkpoint
from pipeline.engine.limits import resolve_limits
from pipeline import faults
from pipeline.errors import PipelineError
from pipeline.runtime.model import ModelArgs
from pipeline.schemas import validate

ENGINE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class EngineTensor:
    """One runtime parameter: its name (`{j}` = local layer), the checkpoint tensors concatenated into it (dim 0)."""

    name: str
    parts: tuple[str, ...]
    optional: bool = False  # biases exist only when the checkpoint has them
    stage: str = "layer"  # "first" (embedding), "layer" (per local layer) or "last" (final norm, head)
    # A condition on the checkpoint config (None: always): the tensor is required when it holds and never read
    # otherwise (a learned position table only with position_embedding_type learned_absolute).
    when: Callable[[dict[str, Any]], bool] | None = None


def _layer(name: str) -> str:
    return f"transformer.layers.{{j}}.{name}"


# The decoder the runtime implements: RMSNorm, fused QKV with rotate-half RoPE, gated MLP (TensorRT-LLM's
# LLaMAForCausalLM and QWenForCausalLM checkpoints).
GATED_DECODER: tuple[EngineTensor, ...] = (
    EngineTensor("embed.weight", ("transformer.vocab_embedding.weight",), stage="first"),
    EngineTensor("layers.{j}.attn_norm.weight", (_layer("input_layernorm.weight"),)),
    EngineTensor("layers.{j}.attn.qkv_weight", (_layer("attention.qkv.weight"),)),
    EngineTensor("layers.{j}.attn.qkv_bias", (_layer("attention.qkv.bias"),), optional=True),
    EngineTensor("layers.{j}.attn.dense_weight", (_layer("attention.dense.weight"),)),
    EngineTensor("layers.{j}.attn.dense_bias", (_layer("attention.dense.bias"),), optional=True),
    EngineTensor("layers.{j}.mlp_norm.weight", (_layer("post_layernorm.weight"),)),
    EngineTensor("layers.{j}.mlp.fc_gate_weight", (_layer("mlp.fc.weight"), _layer("mlp.gate.weight"))),
    EngineTensor("layers.{j}.mlp.fc_gate_bias", (_layer("mlp.fc.bias"), _layer("mlp.gate.bias")), optional=True),
    EngineTensor("layers.{j}.mlp.proj_weight", (_layer("mlp.proj.weight"),)),
    EngineTensor("layers.{j}.mlp.proj_bias", (_layer("mlp.proj.bias"),), optional=True),
    EngineTensor("final_norm.weight", ("transformer.ln_f.weight",), stage="last"),
    EngineTensor("lm_head", ("lm_head.weight",), stage="last"),
)

# Phi-3: GATED_DECODER with TensorRT-LLM's one fused gated fc ([up; gate] rows, see ModelArgs.fc_linear_first).
PHI3_DECODER: tuple[EngineTensor, ...] = tuple(
    EngineTensor(t.name, (_layer("mlp.fc.weight"),)) if t.name == "layers.{j}.mlp.fc_gate_weight" else t
    for t in GATED_DECODER if t.name != "layers.{j}.mlp.fc_gate_bias"
)

# Mixtral: GATED_DECODER's attention with a mixture-of-experts MLP: the float32 router and the stacked experts
# (fc = [w3; w1] per expert, proj) as the checkpoint holds them.
MOE_DECODER: tuple[EngineTensor, ...] = (
    *(t for t in GATED_DECODER if ".mlp." not in t.name),
    EngineTensor("layers.{j}.mlp.router_weight", (_layer("mlp.router.weight"),)),
    EngineTensor("layers.{j}.mlp.fc_weight", (_layer("mlp.fc.weight"),)),
    EngineTensor("layers.{j}.mlp.proj_weight", (_layer("mlp.proj.weight"),)),
)

# Gemma2/3 (TensorRT-LLM's inter_layernorms): a norm on each side of attention and MLP; Gemma3's per-head q/k norms.
SANDWICH_DECODER: tuple[EngineTensor, ...] = (
    *(t for t in GATED_DECODER if not t.optional and t.name != "layers.{j}.mlp_norm.weight"),
    EngineTensor("layers.{j}.attn.q_norm.weight", (_layer("attention.q_layernorm.weight"),), optional=True),
    EngineTensor("layers.{j}.attn.k_norm.weight", (_layer("attention.k_layernorm.weight"),), optional=True),
    EngineTensor("layers.{j}.attn_post_norm.weight", (_layer("post_layernorm.weight"),)),
    EngineTensor("layers.{j}.mlp_norm.weight", (_layer("pre_feedforward_layernorm.weight"),)),
    EngineTensor("layers.{j}.mlp_post_norm.weight", (_layer("post_feedforward_layernorm.weight"),)),
)

def learned_positions(ckpt: dict[str, Any]) -> bool:
    return ckpt.get("position_embedding_type", "learned_absolute") == "learned_absolute"


# GPT-2 style: LayerNorm with bias, plain MLP (TensorRT-LLM's GPTForCausalLM); learned absolute positions, or none
# with ALiBi (Megatron/NeMo GPT with position_embedding_type=alibi), as TensorRT-LLM's GPTEmbedding decides.
GPT_DECODER: tuple[EngineTensor, ...] = (
    EngineTensor("embed.weight", ("transformer.vocab_embedding.weight",), stage="first"),
    EngineTensor("pos_embed.weight", ("transformer.position_embedding.weight",), stage="first",
                 when=learned_positions),
    EngineTensor("layers.{j}.attn_norm.weight", (_layer("input_layernorm.weight"),)),
    EngineTensor("layers.{j}.attn_norm.bias", (_layer("input_layernorm.bias"),)),
    EngineTensor("layers.{j}.attn.qkv_weight", (_layer("attention.qkv.weight"),)),
    EngineTensor("layers.{j}.attn.qkv_bias", (_layer("attention.qkv.bias"),), optional=True),
    EngineTensor("layers.{j}.attn.dense_weight", (_layer("attention.dense.weight"),)),
    EngineTensor("layers.{j}.attn.dense_bias", (_layer("attention.dense.bias"),), optional=True),
    EngineTensor("layers.{j}.mlp_norm.weight", (_layer("post_layernorm.weight"),)),
    EngineTensor("layers.{j}.mlp_norm.bias", (_layer("post_layernorm.bias"),)),
    EngineTensor("layers.{j}.mlp.fc_weight", (_layer("mlp.fc.weight"),)),
    EngineTensor("layers.{j}.mlp.fc_bias", (_layer("mlp.fc.bias"),), optional=True),
    EngineTensor("layers.{j}.mlp.proj_weight", (_layer("mlp.proj.weight"),)),
    EngineTensor("layers.{j}.mlp.proj_bias", (_layer("mlp.proj.bias"),), optional=True),
    # optional: post-norm OPT has no final norm
    EngineTensor("final_norm.weight", ("transformer.ln_f.weight",), optional=True, stage="last"),
    EngineTensor("final_norm.bias", ("transformer.ln_f.bias",), optional=True, stage="last"),
    EngineTensor("lm_head", ("lm_head.weight",), stage="last"),
)


# BLOOM: GPT's tensors without a position table, with the LayerNorm after the embedding.
BLOOM_DECODER: tuple[EngineTensor, ...] = (
    GPT_DECODER[0],
    EngineTensor("embed_norm.weight", ("transformer.ln_embed.weight",), stage="first"),
    EngineTensor("embed_norm.bias", ("transformer.ln_embed.bias",), stage="first"),
    *(t for t in GPT_DECODER[2:] if not t.name.startswith("final_norm")),
    EngineTensor("final_norm.weight", ("transformer.ln_f.weight",), stage="last"),
    EngineTensor("final_norm.bias", ("transformer.ln_f.bias",), stage="last"),
)


# MPT: GPT's tensors without norm biases or a position table; linear biases never written (see archs/mpt.py).
MPT_DECODER: tuple[EngineTensor, ...] = (
    GPT_DECODER[0],
    *(t for t in GPT_DECODER[2:] if not t.name.endswith("norm.bias") and not t.name.startswith("final_norm")),
    EngineTensor("final_norm.weight", ("transformer.ln_f.weight",), stage="last"),
)


def _layernorm_decoder(norms: tuple[tuple[str, str], ...], lm_head_bias: bool) -> tuple[EngineTensor, ...]:
    """LayerNorm (with bias) decoders with rotary positions and a plain MLP: GPT-NeoX and Phi."""
    return (
        EngineTensor("embed.weight", ("transformer.vocab_embedding.weight",), stage="first"),
        *(EngineTensor(f"layers.{{j}}.{ours}.{kind}", (_layer(f"{theirs}.{kind}"),))
          for ours, theirs in norms for kind in ("weight", "bias")),
        EngineTensor("layers.{j}.attn.qkv_weight", (_layer("attention.qkv.weight"),)),
        EngineTensor("layers.{j}.attn.qkv_bias", (_layer("attention.qkv.bias"),), optional=True),
        EngineTensor("layers.{j}.attn.dense_weight", (_layer("attention.dense.weight"),)),
        EngineTensor("layers.{j}.attn.dense_bias", (_layer("attention.dense.bias"),), optional=True),
        EngineTensor("layers.{j}.mlp.fc_weight", (_layer("mlp.fc.weight"),)),
        EngineTensor("layers.{j}.mlp.fc_bias", (_layer("mlp.fc.bias"),), optional=True),
        EngineTensor("layers.{j}.mlp.proj_weight", (_layer("mlp.proj.weight"),)),
        EngineTensor("layers.{j}.mlp.proj_bias", (_layer("mlp.proj.bias"),), optional=True),
        EngineTensor("final_norm.weight", ("transformer.ln_f.weight",), stage="last"),
        EngineTensor("final_norm.bias", ("transformer.ln_f.bias",), stage="last"),
        EngineTensor("lm_head", ("lm_head.weight",), stage="last"),
        *((EngineTensor("lm_head_bias", ("lm_head.bias",), stage="last"),) if lm_head_bias else ()),
    )


NEOX_DECODER = _layernorm_decoder((("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")), False)
PHI_DECODER = _layernorm_decoder((("attn_norm", "input_layernorm"),), True)  # also GPT-J (its biases are optional)


# Falcon: the MLP's norm, when there is one, comes from mlp_layernorm (two-norm new architecture) or post_layernorm
# (sequential models); biases only with `bias`.
FALCON_DECODER: tuple[EngineTensor, ...] = (
    *_layernorm_decoder((("attn_norm", "input_layernorm"),), False),
    *(EngineTensor(f"layers.{{j}}.mlp_norm.{kind}", (_layer(f"{theirs}.{kind}"),), optional=True)
      for theirs in ("mlp_layernorm", "post_layernorm") for kind in ("weight", "bias")),
)


def falcon_residual(ckpt: dict[str, Any]) -> str:
    if ckpt.get("new_decoder_architecture"):
        return "parallel" if (ckpt.get("num_ln_in_parallel_attn") or 2) == 2 else "parallel_shared_norm"
    return "parallel_shared_norm" if ckpt.get("parallel_attention") else "sequential"


@dataclass(frozen=True)
class RuntimeFamily:
    """How the runtime executes a checkpoint architecture: its tensor table and its fixed structural choices."""

    tensors: tuple[EngineTensor, ...]
    norm_type: str  # "rms" or "layer"
    gated_mlp: bool
    residual: str | Callable[[dict[str, Any]], str] = "sequential"  # see ModelArgs.residual; or from the config
    rope_style: str = "neox"
    mlp_bias_before_reduce: bool = False
    scale_embedding: bool = False  # multiply embeddings by sqrt(hidden_size) (Gemma)
    embedding_norm: bool = False  # a norm right after the embedding (BLOOM)
    norm_bias: bool = True  # LayerNorms with a bias (MPT's have none)
    fc_linear_first: bool = False  # the fused gated fc is [linear; activated] (Phi-3)


GATED_RMS = RuntimeFamily(GATED_DECODER, norm_type="rms", gated_mlp=True)
PHI3 = RuntimeFamily(PHI3_DECODER, norm_type="rms", gated_mlp=True, fc_linear_first=True)
MOE_RMS = RuntimeFamily(MOE_DECODER, norm_type="rms", gated_mlp=True)
GEMMA = RuntimeFamily(GATED_DECODER, norm_type="rms", gated_mlp=True, scale_embedding=True)
GEMMA2 = RuntimeFamily(SANDWICH_DECODER, norm_type="rms", gated_mlp=True, residual="sandwich", scale_embedding=True)
GPT = RuntimeFamily(GPT_DECODER, norm_type="layer", gated_mlp=False)
BLOOM = RuntimeFamily(BLOOM_DECODER, norm_type="layer", gated_mlp=False, embedding_norm=True)
NEOX = RuntimeFamily(NEOX_DECODER, norm_type="layer", gated_mlp=False, residual="parallel")
PHI = RuntimeFamily(PHI_DECODER, norm_type="layer", gated_mlp=False, residual="parallel_shared_norm")
FALCON = RuntimeFamily(FALCON_DECODER, norm_type="layer", gated_mlp=False, residual=falcon_residual)
MPT = RuntimeFamily(MPT_DECODER, norm_type="layer", gated_mlp=False, norm_bias=False)
GPTJ = RuntimeFamily(PHI_DECODER, norm_type="layer", gated_mlp=False, residual="parallel_shared_norm",
                     rope_style="gptj", mlp_bias_before_reduce=True)

RUNTIME_LAYOUTS: dict[str, RuntimeFamily] = {
    "LlamaForCausalLM": GATED_RMS,
    "MistralForCausalLM": GATED_RMS,
    "Qwen2ForCausalLM": GATED_RMS,
    "Phi3ForCausalLM": PHI3,
    "MixtralForCausalLM": MOE_RMS,
    "GPTForCausalLM": GPT,
    "GPTNeoXForCausalLM": NEOX,
    "PhiForCausalLM": PHI,
    "GPTJForCausalLM": GPTJ,
    "GemmaForCausalLM": GEMMA,
    "Gemma2ForCausalLM": GEMMA2,
    "Gemma3ForCausalLM": GEMMA2,
    "OPTForCausalLM": GPT,  # post-norm when do_layer_norm_before is false (see model_args)
    "FalconForCausalLM": FALCON,
    "BloomForCausalLM": BLOOM,
    "MPTForCausalLM": MPT,
    "MptForCausalLM": MPT,
}
SUPPORTED_POSITIONS = {"rope_gpt_neox", "rope_gptj", "long_rope", "learned_absolute", "alibi", "alibi_with_scale"}


def rotary_scaling(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's rope scaling as the runtime computes it: `rotary_scaling`, or TensorRT-LLM's long_rope
    fields (Phi-3: short/long factors and the original length beside position_embedding_type long_rope)."""
    if ckpt.get("position_embedding_type") != "long_rope":
        return ckpt.get("rotary_scaling")
    return {"type": "longrope", "short_factor": ckpt["longrope_scaling_short_factors"],
            "long_factor": ckpt["longrope_scaling_long_factors"],
            "original_max_position_embeddings": ckpt["original_max_position_embeddings"]}


def model_args(ckpt: dict[str, Any], tp_rank: int, pp_rank: int, names: set[str], family: RuntimeFamily) -> ModelArgs:
    m = ckpt["mapping"]
    moe = ckpt.get("moe") or {}
    experts = int(moe.get("num_experts") or 0)
    moe_tp, moe_ep = moe_parallel(m)
    heads = ckpt["num_attention_heads"]
    head_size = ckpt.get("head_size") or ckpt["hidden_size"] // heads
    positions = ckpt.get("position_embedding_type")
    learned = positions == "learned_absolute"
    alibi = positions in ("alibi", "alibi_with_scale")
    return ModelArgs(
        hidden_size=ckpt["hidden_size"],
        num_heads=heads,
        num_kv_heads=ckpt.get("num_key_value_heads") or heads,
        head_size=head_size,
        intermediate_size=ckpt.get("intermediate_size") or 4 * ckpt["hidden_size"],
        vocab_size=ckpt["vocab_size"],
        num_layers=ckpt["num_hidden_layers"],
        layers=list(pp_layers(ckpt["num_hidden_layers"], m["pp_size"], pp_rank)),
        norm_eps=float(ckpt.get("norm_epsilon", 1e-5)),
        hidden_act=ckpt.get("hidden_act", "silu"),
        dtype=ckpt["dtype"],
        rotary_dim=0 if learned or alibi else int(ckpt.get("rotary_embedding_dim") or ckpt.get("rotary_dim")
                                         or head_size * float(ckpt.get("rotary_pct", 1.0))),
        rotary_base=float(ckpt.get("rotary_base", ckpt.get("rotary_emb_base", 10000.0))),
        rotary_scaling=rotary_scaling(ckpt),
        rope_max_positions=int(ckpt.get("max_position_embeddings") or 2048),
        qkv_bias="transformer.layers.0.attention.qkv.bias" in names,
        dense_bias="transformer.layers.0.attention.dense.bias" in names,
        mlp_bias="transformer.layers.0.mlp.fc.bias" in names,
        use_parallel_embedding=bool(ckpt.get("use_parallel_embedding", False)),
        embedding_sharding_dim=int(ckpt.get("embedding_sharding_dim", 0)),
        tp_size=m["tp_size"],
        norm_type=family.norm_type,
        gated_mlp=family.gated_mlp,
        # OPT's do_layer_norm_before=false puts the norms after the residual additions and drops the final norm.
        residual="post_norm" if ckpt.get("do_layer_norm_before") is False
        else family.residual(ckpt) if callable(family.residual) else family.residual,
        final_norm=ckpt.get("do_layer_norm_before") is not False,
        rope_style=family.rope_style,
        mlp_bias_before_reduce=family.mlp_bias_before_reduce,
        embedding_scale=float(ckpt["hidden_size"]) ** 0.5 if family.scale_embedding else 1.0,
        lm_head_bias="lm_head.bias" in names,
        max_positions=int(ckpt.get("max_position_embeddings") or 2048) if learned else 0,
        act_quant=_act_quant(ckpt),
        kv_cache_quant=((ckpt.get("quantization") or {}).get("kv_cache_quant_algo") or "").lower() or None,
        num_experts=experts,
        top_k=int(moe.get("top_k") or 0),
        moe_tp_size=moe_tp,
        moe_ep_size=moe_ep,
        # TensorRT-LLM's Mapping: moe_ep_rank = tp_rank mod moe_ep_size, each holding a contiguous block of experts.
        expert_offset=(tp_rank % moe_ep) * (experts // moe_ep),
        # Gemma2/3 fields (absent elsewhere): query scaling, soft-caps, q/k norms, sliding-window layers.
        attn_scale=float(ckpt["query_pre_attn_scalar"]) ** -0.5 if ckpt.get("query_pre_attn_scalar") else 0.0,
        attn_softcap=float(ckpt.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(ckpt.get("final_logit_softcapping") or 0.0),
        qk_norm="transformer.layers.0.attention.q_layernorm.weight" in names,
        # Gemma2/3 name their pattern; a sliding_window without one slides every layer (Mistral) or the layers from
        # max_window_layers on (Qwen2 with use_sliding_window).
        sliding_window=int(ckpt.get("sliding_window") or 0) if ckpt.get("_sliding_window_pattern", 0) != 1 else 0,
        sliding_window_pattern=int(ckpt.get("_sliding_window_pattern") or 0),
        first_sliding_layer=int(ckpt.get("max_window_layers") or 0),
        rotary_base_local=float(ckpt.get("rope_local_base_freq") or 0.0),
        alibi=alibi,
        embedding_norm=family.embedding_norm,
        alibi_scale=head_size ** -0.5 if positions == "alibi_with_scale" else 1.0,
        alibi_bias_max=float(ckpt.get("alibi_bias_max") or 8.0),
        norm_bias=family.norm_bias,
        clip_qkv=float(ckpt.get("clip_qkv") or 0.0),
        fc_linear_first=family.fc_linear_first,
    )


def _act_quant(ckpt: dict[str, Any]) -> str | None:
    from pipeline.quantize.engine_format import FORMATS

    algo = (ckpt.get("quantization") or {}).get("quant_algo")
    return FORMATS[algo].act_quant if algo in FORMATS else None


def engine_config(ckpt: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": f"trtllm-pipeline {__version__}",
        "pretrained_config": ckpt,
        "build_config": limits,
        "engine": {"backend": "cpu", "format_version": ENGINE_FORMAT_VERSION},
    }


class CpuBackend:
    name = "cpu"

    def preflight(self, ckpt: dict[str, Any], build_config: dict[str, Any]) -> dict[str, Any]:
        """What `build` would refuse, from the checkpoint config alone: the resolved limits, or an error."""
        family = RUNTIME_LAYOUTS.get(ckpt["architecture"])
        if family is None or ckpt.get("position_embedding_type") not in SUPPORTED_POSITIONS:
            raise PipelineError(f"the cpu backend cannot run architecture {ckpt['architecture']} with "
                                f"position_embedding_type={ckpt.get('position_embedding_type')} (architectures: "
                                f"{sorted(RUNTIME_LAYOUTS)}; positions: {sorted(SUPPORTED_POSITIONS)})")
        from pipeline.quantize.engine_format import FORMATS

        algo = (ckpt.get("quantization") or {}).get("quant_algo")
        if algo and algo not in FORMATS:
            raise PipelineError(f"the cpu backend cannot run quant_algo={algo}; it runs {sorted(FORMATS)}")
        return resolve_limits(build_config, ckpt)

    def build(self, checkpoint_dir: Path, engine_dir: Path, build_config: dict[str, Any]) -> dict[str, Any]:
        problems = validate_checkpoint(checkpoint_dir)
        if problems:
            raise PipelineError(f"checkpoint {checkpoint_dir} is inconsistent: {problems[0]}"
                                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        ckpt = json.loads((checkpoint_dir / "config.json").read_text())
        limits = self.preflight(ckpt, build_config)
        family = RUNTIME_LAYOUTS[ckpt["architecture"]]
        config = engine_config(ckpt, limits)
        validate(config, "engine_config", what="engine config.json")
        engine_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        total = 0
        m = ckpt["mapping"]
        quant = QuantReader.for_checkpoint(checkpoint_dir, ckpt)
        for rank in range(m["world_size"]):
            total += self._build_rank(checkpoint_dir / f"rank{rank}.safetensors", engine_dir / f"rank{rank}.engine",
                                      ckpt, limits, family, rank, quant)
        (engine_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if (checkpoint_dir / "tokenizer").is_dir():
            shutil.copytree(checkpoint_dir / "tokenizer", engine_dir / "tokenizer")
        return {"engine_bytes": total, "build_seconds": round(time.perf_counter() - started, 3)}

    def _build_rank(self, src: Path, dst: Path, ckpt, limits, family: RuntimeFamily, rank: int,
                    quant: "QuantReader | None" = None) -> int:
        with safe_open(str(src), framework="pt") as f:
            args, plan = rank_plan(f, src, ckpt, family, rank)
            declared = []
            for name, parts in plan:
                if quant is not None and quant.covers(parts):
                    declared += [(n, tuple(t.shape), t.dtype)
                                 for n, t in quant.engine_tensors(f, name, parts, shapes_only=True).items()]
                    continue
                shapes = [tuple(f.get_slice(p).get_shape()) for p in parts]
                rows = sum(s[0] for s in shapes)
                declared.append((name, (rows, *shapes[0][1:]), TORCH_DTYPES[f.get_slice(parts[0]).get_dtype()]))
            meta = {"engine": json.dumps({"format_version": ENGINE_FORMAT_VERSION, "backend": "cpu", "rank": rank,
                                          "mapping": ckpt["mapping"], "model": asdict(args), "limits": limits})}
            writer = StreamingSafetensorsWriter(dst, declared, metadata=meta)
            try:
                for name, parts in plan:
                    if quant is not None and quant.covers(parts):
                        for n, t in quant.engine_tensors(f, name, parts).items():
                            writer.write(n, t)
                        continue
                    tensors = [f.get_tensor(p) for p in parts]
                    writer.write(name, tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0))
                writer.close()
                faults.point("build:rank")
            except BaseException:
                writer.abort()
                raise
        return dst.stat().st_size


def rank_plan(f, src: str | Path, ckpt: dict[str, Any], family: RuntimeFamily,
              rank: int) -> tuple[ModelArgs, list[tuple[str, list[str]]]]:
    """The runtime model of one rank (`f` its open checkpoint file, `src` that file's path or what else the tensors
    are read from) and its engine tensors in order: (engine name, the checkpoint tensors concatenated along dim 0
    into it)."""
    tp_rank, pp_rank = rank % ckpt["mapping"]["tp_size"], rank // ckpt["mapping"]["tp_size"]
    names = set(f.keys())
    args = model_args(ckpt, tp_rank, pp_rank, names, family)
    plan = []
    for t, j in _instances(family.tensors + QUANT_TENSORS, len(args.layers), pp_rank, ckpt["mapping"]["pp_size"]):
        if t.when is not None and not t.when(ckpt):
            continue
        parts = [p.format(j=j) for p in t.parts]
        missing = [p for p in parts if p not in names]
        if missing and not t.optional:
            raise PipelineError(f"{src}: tensor {missing[0]} is missing")
        if not missing:
            plan.append((t.name.format(j=j), parts))
    return args, plan


class CheckpointRank:
    """One rank of an unquantized checkpoint read as its engine would hold it, each engine tensor computed from the
    checkpoint when asked for, without writing an engine: what calibration runs (its float engine is read once,
    layer by layer, so an engine file would only be written and read back once more). `tensors` reads the rank's
    checkpoint tensors (`keys()`, `get_tensor(name)`): its safetensors file (`CheckpointRank.open`) or a converter's
    view that computes them from the source. Use as a context manager."""

    def __init__(self, ckpt: dict[str, Any], tensors, build_config: dict[str, Any], where: str | Path,
                 rank: int = 0):
        CpuBackend().preflight(ckpt, build_config)
        if (ckpt.get("quantization") or {}).get("quant_algo"):
            raise PipelineError(f"{where}: CheckpointRank reads float checkpoints only")
        self._tensors = tensors
        self.args, plan = rank_plan(tensors, where, ckpt, RUNTIME_LAYOUTS[ckpt["architecture"]], rank)
        self._parts = dict(plan)

    @classmethod
    def open(cls, checkpoint_dir: Path, build_config: dict[str, Any], rank: int = 0) -> "CheckpointRank":
        ckpt = json.loads((checkpoint_dir / "config.json").read_text())
        src = checkpoint_dir / f"rank{rank}.safetensors"
        return cls(ckpt, safe_open(str(src), framework="pt"), build_config, src, rank)

    def keys(self) -> list[str]:
        return list(self._parts)

    def get_tensor(self, name: str) -> torch.Tensor:
        parts = [self._tensors.get_tensor(p) for p in self._parts[name]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def __enter__(self) -> "CheckpointRank":
        return self

    def __exit__(self, *exc) -> None:
        self._tensors = None  # a safe_open handle closes when dropped


# Present in any family's checkpoint when the KV cache is quantized.
QUANT_TENSORS: tuple[EngineTensor, ...] = (
    EngineTensor("layers.{j}.attn.kv_scale", (_layer("attention.kv_cache_scaling_factor"),), optional=True),
)


class QuantReader:
    """Turns a quantized checkpoint's linear modules into the engine's quantized form (see
    pipeline.quantize.engine_format), one runtime parameter at a time."""

    def __init__(self, algo: str, exclude_modules, gptq_sm: int):
        from pipeline.quantize.engine_format import FORMATS

        self.algo, self.exclude, self.gptq_sm = algo, exclude_modules, gptq_sm
        self.format = FORMATS[algo]

    @classmethod
    def for_checkpoint(cls, checkpoint_dir: Path, ckpt: dict[str, Any]) -> "QuantReader | None":
        from pipeline.quantize.engine_format import FORMATS

        q = ckpt.get("quantization") or {}
        algo = q.get("quant_algo")
        if not algo:
            return None
        if algo not in FORMATS:
            raise PipelineError(f"the cpu backend cannot run quant_algo={algo}; it runs {sorted(FORMATS)}")
        layout = checkpoint_dir / QUANT_LAYOUT_FILE
        gptq_sm = json.loads(layout.read_text()).get("gptq_sm", 80) if layout.is_file() else 80
        return cls(algo, q.get("exclude_modules"), gptq_sm)

    def covers(self, parts: list[str]) -> bool:
        from pipeline.quantize.schemes import quantized_linear

        return all(quantized_linear(p, self.exclude) is not None for p in parts)

    def engine_tensors(self, f, name: str, parts: list[str], shapes_only: bool = False) -> dict[str, torch.Tensor]:
        """The engine tensors of runtime parameter `name` (fused from `parts`); with `shapes_only`, meta tensors
        computed from the checkpoint's shapes and dtypes (no data read)."""
        from pipeline.quantize.engine_format import fuse

        pieces = []
        for m in (p[: -len(".weight")] for p in parts):
            missing = [s for s in self.format.suffixes if f"{m}.{s}" not in f.keys()]
            if missing:
                raise PipelineError(f"quant_algo={self.algo}: tensor {m}.{missing[0]} is missing from the checkpoint")
            tensors = {s: _meta(f, f"{m}.{s}") if shapes_only else f.get_tensor(f"{m}.{s}")
                       for s in self.format.suffixes}
            pieces.append(self.format.read(tensors, self.gptq_sm))
        return fuse(pieces, name).tensors(name)


def _meta(f, name: str) -> torch.Tensor:
    piece = f.get_slice(name)
    return torch.empty(piece.get_shape(), dtype=TORCH_DTYPES[piece.get_dtype()], device="meta")


# A file beside a quantized checkpoint (TensorRT-LLM ignores it) recording the GPU layout of GPTQ weights.
QUANT_LAYOUT_FILE = "quant_layout.json"


def _instances(layout, num_local_layers: int, pp_rank: int, pp_size: int):
    """(tensor, local layer) for this pipeline stage: embedding on the first, final norm and head on the last."""
    for t in layout:
        if t.stage == "layer":
            yield from ((t, j) for j in range(num_local_layers))
        elif (t.stage == "first" and pp_rank == 0) or (t.stage == "last" and pp_rank == pp_size - 1):
            yield t, None


BACKEND = CpuBackend()
