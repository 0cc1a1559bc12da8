"""The engine model: a compact decoder in the gpt-fast spirit.

Every module reads its sizes from `ModelArgs` (the engine file's metadata), holds only this rank's shard, and keeps
its forward free of data-dependent Python control flow: positions are explicit tensors, the KV cache has one
`update`, RoPE and the TP all-reduce are small helpers. `step` is the one entry point a backend exports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.runtime.kernels import TorchKernel
from pipeline.runtime.kv_cache import KVCache
from pipeline.runtime.parallel import Dist, tp_all_gather, tp_all_reduce

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Engine tensors beside a quantized linear weight `N` (`N.scale`, ...; see pipeline.quantize.engine_format).
QUANT_SUFFIXES = ("scale", "zero", "prequant", "act_scale")
QUANTIZED_DTYPES = (torch.int8, torch.uint8, torch.float8_e4m3fn)
ACTIVATIONS = {"silu": F.silu, "swiglu": F.silu, "gelu": F.gelu, "relu": F.relu,
               "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class ModelArgs:
    """Everything the runtime needs about the model, as stored in the engine file."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int
    vocab_size: int
    num_layers: int  # all layers of the model
    layers: list[int]  # global indices of this stage's layers
    norm_eps: float
    hidden_act: str
    dtype: str
    rotary_dim: int
    rotary_base: float
    rotary_scaling: dict[str, Any] | None = None
    rope_max_positions: int = 0  # the model's max_position_embeddings (dynamic NTK, yarn/longrope factors)
    qkv_bias: bool = False
    dense_bias: bool = False
    mlp_bias: bool = False
    use_parallel_embedding: bool = False
    embedding_sharding_dim: int = 0
    tp_size: int = 1
    norm_type: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm with bias)
    gated_mlp: bool = True  # proj(act(fc(x)) * gate(x)), else proj(act(fc(x)))
    max_positions: int = 0  # rows of the learned absolute position table (0: rotary positions)
    # "sequential": x + attn(n1(x)), then h + mlp(n2(h)); "parallel": x + attn(n1(x)) + mlp(n2(x));
    # "parallel_shared_norm": x + attn(n(x)) + mlp(n(x)) (one norm); "post_norm": h = n1(x + attn(x)),
    # then n2(h + mlp(h)) (OPT with do_layer_norm_before false).
    residual: str = "sequential"
    lm_head_bias: bool = False
    rope_style: str = "neox"  # "neox": rotate halves; "gptj": rotate interleaved pairs
    embedding_scale: float = 1.0  # Gemma multiplies the embedding output by sqrt(hidden_size)
    final_norm: bool = True  # post-norm OPT has no norm before the head
    mlp_bias_before_reduce: bool = False  # GPT-J: the MLP output bias lives on tp rank 0 and joins the reduction
    act_quant: str | None = None  # "int8" / "fp8": quantized linears quantize their inputs (SmoothQuant, FP8)
    kv_cache_quant: str | None = None  # "int8" / "fp8": the KV cache stores quantized values with a per-layer scale
    # Mixture of experts (0 experts: a dense MLP). The tp ranks split each expert's inner size over moe_tp_size and
    # hold num_experts / moe_ep_size whole experts; this rank's are [expert_offset, expert_offset + local experts).
    num_experts: int = 0
    top_k: int = 0
    moe_tp_size: int = 1
    moe_ep_size: int = 1
    expert_offset: int = 0
    attn_scale: float = 0.0  # query scaling (0: 1/sqrt(head_size)); Gemma2/3: query_pre_attn_scalar**-0.5
    attn_softcap: float = 0.0  # cap * tanh(scores / cap) on attention scores (0: none; Gemma2)
    final_softcap: float = 0.0  # the same on the logits (Gemma2/3)
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Gemma3)
    # Sliding-window attention: layer i sees only the last sliding_window positions (0: every layer global) when
    # i >= first_sliding_layer and, with a pattern p > 0, (i + 1) % p != 0 (Gemma2/3: every p-th layer global;
    # Mistral: pattern 0, every layer slides; Qwen2: layers from max_window_layers on).
    sliding_window: int = 0
    sliding_window_pattern: int = 1
    first_sliding_layer: int = 0
    rotary_base_local: float = 0.0  # RoPE base of the sliding layers (0: rotary_base); Gemma3
    # ALiBi (no rotary positions): each head adds slope x key position to its scores, times alibi_scale
    # (TensorRT-LLM's alibi: 1; alibi_with_scale (Falcon): the query scaling 1/sqrt(head_size)).
    alibi: bool = False
    alibi_scale: float = 1.0
    alibi_bias_max: float = 8.0  # the slopes' exponent range (MPT's alibi_bias_max)
    norm_bias: bool = True  # LayerNorms carry a bias (MPT's do not)
    clip_qkv: float = 0.0  # clamp the fused qkv projection to [-clip_qkv, clip_qkv] (0: none; MPT)
    embedding_norm: bool = False  # a norm right after the embedding (BLOOM's word_embeddings_layernorm)
    fc_linear_first: bool = False  # the fused gated fc holds [linear; activated] (Phi-3's swiglu), not [act; linear]

    def is_sliding(self, layer: int) -> bool:
        if self.sliding_window <= 0 or layer < self.first_sliding_layer:
            return False
        return self.sliding_window_pattern == 0 or (layer + 1) % self.sliding_window_pattern != 0

    @property
    def vocab_padded(self) -> int:
        return -(-self.vocab_size // self.tp_size) * self.tp_size

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.tp_size

    @property
    def local_kv_heads(self) -> int:
        return -(-self.num_kv_heads // self.tp_size)


def rope_kind(scaling: dict[str, Any] | None) -> str:
    """TensorRT-LLM reads the scaling type from `type`, else `rope_type`."""
    scaling = scaling or {}
    return scaling.get("type", scaling.get("rope_type", "none"))


# Scalings whose frequencies depend on the sequence length reached: their cos/sin are computed per step from the
# positions instead of read from a table.
LENGTH_DEPENDENT_ROPE = {"dynamic", "longrope"}


def _rope_exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


def rope_inv_freq(args: ModelArgs, seq_len: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary inverse frequencies [rotary_dim / 2], with the model's scaling applied (formulas as transformers'
    rope utilities compute them). For the length-dependent kinds, `seq_len` [B] (each sequence's length so far)
    gives per-sequence frequencies [B, rotary_dim / 2]."""
    dim, base = args.rotary_dim, args.rotary_base
    s = args.rotary_scaling or {}
    kind = rope_kind(s)
    if kind == "dynamic" and seq_len is not None:  # NTK: the base grows once the sequence passes the model's length
        mpe, factor = float(args.rope_max_positions), float(s["factor"])
        seq = torch.clamp(seq_len.float(), min=mpe)
        grown = base * ((factor * seq / mpe) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (grown[:, None] ** _rope_exponents(dim)[None, :])
    if kind == "longrope":  # short factors within the original length, long factors beyond it (per sequence)
        power = base ** _rope_exponents(dim)
        short = 1.0 / (torch.tensor(s["short_factor"], dtype=torch.float32) * power)
        if seq_len is None:
            return short
        long = 1.0 / (torch.tensor(s["long_factor"], dtype=torch.float32) * power)
        beyond = seq_len > int(s["original_max_position_embeddings"])
        return torch.where(beyond[:, None], long[None, :], short[None, :])
    inv_freq = 1.0 / (base ** _rope_exponents(dim))
    if kind == "linear":
        inv_freq = inv_freq / float(s["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, s)
    elif kind == "yarn":
        inv_freq = _yarn_inv_freq(args, s)
    return inv_freq


def rope_attention_factor(args: ModelArgs) -> float:
    """The factor yarn and longrope multiply cos and sin by (1 for the other kinds)."""
    s = args.rotary_scaling or {}
    kind = rope_kind(s)
    if kind not in ("yarn", "longrope"):
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    orig = float(s["original_max_position_embeddings"])
    factor = float(s.get("factor") or args.rope_max_positions / orig)
    if kind == "longrope":
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(factor, float(s["mscale"])) / mscale(factor, float(s["mscale_all_dim"]))
    return mscale(factor)


def _yarn_inv_freq(args: ModelArgs, s: dict[str, Any]) -> torch.Tensor:
    """YaRN: interpolated (divided by the factor) low frequencies, extrapolated high ones, a linear ramp between
    the dimensions that turn beta_fast and beta_slow times over the original length."""
    dim, base = args.rotary_dim, args.rotary_base
    orig = float(s["original_max_position_embeddings"])
    factor = float(s.get("factor") or args.rope_max_positions / orig)
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    power = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    return (1.0 / (factor * power)) * (1 - extrapolation) + (1.0 / power) * extrapolation


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    medium = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return torch.where(medium, smoothed, out)


def rope_tables(args: ModelArgs, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [max_positions, rotary_dim], float32 (see rope_cos_sin)."""
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(args))
    return rope_cos_sin(args, freqs)


def rope_cos_sin(args: ModelArgs, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position x frequency angles [..., rotary_dim / 2] -> [..., rotary_dim]: the frequencies
    repeated as two halves (neox style) or each twice in a row (gptj style), matching how each style pairs
    dimensions; scaled by yarn's or longrope's attention factor."""
    emb = freqs.repeat_interleave(2, dim=-1) if args.rope_style == "gptj" else torch.cat([freqs, freqs], dim=-1)
    factor = rope_attention_factor(args)
    return emb.cos() * factor, emb.sin() * factor


def rope_for_positions(args: ModelArgs, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, T, rotary_dim] for the length-dependent scalings. The length is the batch's highest position
    + 1 in this step, as transformers computes it for a batch (its padded prefill width, then the longest
    sequence); one sequence alone gets its own length, as in TensorRT-LLM. Keys keep the rotation they were cached
    with."""
    seq_len = (input_pos.max() + 1).expand(input_pos.shape[0])
    inv_freq = rope_inv_freq(args, seq_len)  # [B, rotary_dim / 2]
    return rope_cos_sin(args, input_pos.float()[:, :, None] * inv_freq[:, None, :])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [B, heads, T, D]; cos/sin: [B, 1, T, R], R <= D (partial rotary leaves the rest)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:  # static (the head size): full rotary needs no pass-through part
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


def alibi_slopes(num_heads: int, bias_max: float = 8.0) -> torch.Tensor:
    """ALiBi slopes [num_heads], float32, as BLOOM and TensorRT-LLM compute them: a geometric series
    2^(-bias_max * i / n) for the largest power of two n of heads, and for the remaining heads every other term of
    the series of 2n (MPT's `alibi_bias_max` is bias_max; everyone else uses 8)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-bias_max / closest)
    slopes = torch.pow(torch.tensor(base, dtype=torch.float32), torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = 2.0 ** (-bias_max / (2 * closest))
        extra = torch.arange(1, 1 + 2 * min(closest, num_heads - closest), 2, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(torch.tensor(extra_base, dtype=torch.float32), extra)])
    return slopes


def alibi_bias(slopes: torch.Tensor, visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias [B, heads, T, S]: slope x key position where visible (mask [B, 1, T, S]), -inf
    elsewhere. Softmax is shift-invariant per query, so this equals slope x (key - query position)."""
    keys = torch.arange(visible.shape[-1], dtype=torch.float32)
    bias = (slopes[:, None, None] * keys).unsqueeze(0)  # [1, heads, 1, S]
    return torch.where(visible, bias, torch.tensor(float("-inf"))).to(dtype)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


def softcapped_attention(q, k, v, mask, scale: float, cap: float) -> torch.Tensor:
    """Attention with tanh-capped scores (SDPA cannot cap): q [B, h, T, D], k/v [B, kv_h, S, D] (KV heads repeated
    here), mask [B, 1, T, S] (True = visible); softmax in float32 as transformers does."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = softcap(torch.matmul(q, k.transpose(-1, -2)) * scale, cap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def apply_rope_gptj(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-J RoPE: dimensions (0, 1), (2, 3), ... rotate as pairs; same shapes as apply_rope."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    rotated = torch.stack([-x_rot[..., 1::2], x_rot[..., ::2]], dim=-1).flatten(-2)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


class RMSNorm(nn.Module):
    """Computed by the engine's kernel (TorchKernel.rms_norm is the formula; a compiled kernel may fuse it)."""

    def __init__(self, dim: int, eps: float, kernel: TorchKernel | None = None):
        super().__init__()
        self.eps, self.kernel = eps, kernel or TorchKernel()
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def make_norm(args: "ModelArgs", kernel: TorchKernel | None = None) -> nn.Module:
    if args.norm_type == "layer":
        return LayerNorm(args.hidden_size, args.norm_eps, args.norm_bias)
    return RMSNorm(args.hidden_size, args.norm_eps, kernel)


def _bias(enabled: bool, size: int) -> nn.Parameter | None:
    return nn.Parameter(torch.empty(size)) if enabled else None


class Attention(nn.Module):
    linear_weights = ("qkv_weight", "dense_weight")

    def __init__(self, args: ModelArgs, d: Dist, linear: TorchKernel):
        super().__init__()
        self.args, self.d, self.linear = args, d, linear
        h, dh = args.hidden_size, args.head_size
        qkv_out = (args.local_heads + 2 * args.local_kv_heads) * dh
        self.qkv_weight = nn.Parameter(torch.empty(qkv_out, h))
        self.qkv_bias = _bias(args.qkv_bias, qkv_out)
        self.dense_weight = nn.Parameter(torch.empty(h, args.local_heads * dh))
        self.dense_bias = _bias(args.dense_bias, h)
        self.rope = apply_rope_gptj if args.rope_style == "gptj" else apply_rope
        # The KV cache's dequantization scale (TensorRT-LLM's kv_cache_scaling_factor), when it is quantized.
        self.kv_scale = nn.Parameter(torch.empty(1)) if args.kv_cache_quant else None
        self.q_norm = RMSNorm(dh, args.norm_eps, linear) if args.qk_norm else None
        self.k_norm = RMSNorm(dh, args.norm_eps, linear) if args.qk_norm else None
        self.scale = args.attn_scale or dh ** -0.5
        # Full rotate-half RoPE, causal attention over an unquantized, unwindowed cache, nothing else (Llama, Qwen2,
        # Mixtral, ...): the case a kernel may fuse (see TorchKernel.attention).
        self.plain = (args.rotary_dim == dh and args.rope_style == "neox" and not (
            args.qk_norm or args.clip_qkv or args.attn_softcap or args.alibi or args.sliding_window or args.kv_cache_quant))

    def forward(self, x, cos, sin, mask, cache: KVCache, input_pos, kv_len: int) -> torch.Tensor:
        # x: [B, T, H]; mask: [B, 1, T, kv_len] (True = visible), or with ALiBi an additive bias [B, heads, T, kv_len]
        qkv = self.linear(x, self.qkv_weight, self.qkv_bias)
        y = self.linear.attention(self, qkv, cos, sin, mask, cache, input_pos, kv_len)
        y = self.linear(y, self.dense_weight)
        y = tp_all_reduce(y, self.d)
        # Row-parallel bias is added after the reduction: every rank holds the full bias.
        return y if self.dense_bias is None else y + self.dense_bias

    def attend(self, qkv, cos, sin, mask, cache: KVCache, input_pos, kv_len: int) -> torch.Tensor:
        """The fused projection's output [B, T, (heads + 2 kv_heads) * D] -> attention output [B, T, heads * D]:
        RoPE, the cache update, attention."""
        a = self.args
        b, t, _ = qkv.shape
        if a.clip_qkv:  # fixed per model (MPT); elementwise, so each tp rank clamps its own columns
            qkv = qkv.clamp(-a.clip_qkv, a.clip_qkv)
        heads = qkv.view(b, t, a.local_heads + 2 * a.local_kv_heads, a.head_size).transpose(1, 2)  # [B, h, T, D]
        qk, v = heads.split([a.local_heads + a.local_kv_heads, a.local_kv_heads], 1)
        if a.qk_norm:  # fixed per model (Gemma3): per-head RMSNorm before RoPE
            q, k = qk.split([a.local_heads, a.local_kv_heads], 1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], 1)
        if a.rotary_dim:  # fixed per model: rotary models rotate q and k (one call for both), learned-position ones not
            qk = self.rope(qk, cos, sin)
        q, k = qk.split([a.local_heads, a.local_kv_heads], 1)
        k_all, v_all = cache.update(input_pos, k, v, kv_len, self.kv_scale)
        if a.attn_softcap:  # fixed per model (Gemma2)
            y = softcapped_attention(q, k_all, v_all, mask, self.scale, a.attn_softcap)
        else:
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=self.scale,
                                               enable_gqa=a.local_heads != a.local_kv_heads)
        return y.transpose(1, 2).reshape(b, t, a.local_heads * a.head_size)


class GatedMLP(nn.Module):
    """proj(act(fc(x)) * gate(x)); fc and gate are fused at build time into one [fc; gate] matrix."""

    linear_weights = ("fc_gate_weight", "proj_weight")

    def __init__(self, args: ModelArgs, d: Dist, linear: TorchKernel):
        super().__init__()
        self.d, self.linear = d, linear
        self.linear_first = args.fc_linear_first
        h, inner = args.hidden_size, args.intermediate_size // args.tp_size
        self.act = ACTIVATIONS[args.hidden_act]
        self.fc_gate_weight = nn.Parameter(torch.empty(2 * inner, h))
        self.fc_gate_bias = _bias(args.mlp_bias, 2 * inner)
        self.proj_weight = nn.Parameter(torch.empty(h, inner))
        self.proj_bias = _bias(args.mlp_bias, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.linear(x, self.fc_gate_weight, self.fc_gate_bias)
        # linear_first is fixed per model (Phi-3: [up; gate], the activation on the second half)
        h = self.linear.gated_activation(fused, self.act, self.linear_first)
        y = tp_all_reduce(self.linear(h, self.proj_weight), self.d)
        return y if self.proj_bias is None else y + self.proj_bias


class PlainMLP(nn.Module):
    """proj(act(fc(x))) (GPT-2 style)."""

    linear_weights = ("fc_weight", "proj_weight")

    def __init__(self, args: ModelArgs, d: Dist, linear: TorchKernel):
        super().__init__()
        self.d, self.linear = d, linear
        self.bias_before_reduce = args.mlp_bias_before_reduce
        h, inner = args.hidden_size, args.intermediate_size // args.tp_size
        self.act = ACTIVATIONS[args.hidden_act]
        self.fc_weight = nn.Parameter(torch.empty(inner, h))
        self.fc_bias = _bias(args.mlp_bias, inner)
        self.proj_weight = nn.Parameter(torch.empty(h, inner))
        self.proj_bias = _bias(args.mlp_bias, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.linear(x, self.fc_weight, self.fc_bias))
        if self.bias_before_reduce:  # rank 0 holds the bias, the others zeros: the reduction adds it once
            return tp_all_reduce(self.linear(h, self.proj_weight, self.proj_bias), self.d)
        y = tp_all_reduce(self.linear(h, self.proj_weight), self.d)
        return y if self.proj_bias is None else y + self.proj_bias


class MoeMLP(nn.Module):
    """Mixtral's sparse MoE MLP: float32 router logits, softmax, top-k renormalized to sum to 1. Expert weights are
    stacked: fc [E_local, 2 * I_local, H] = [linear (w3); activated (w1)] per expert, proj [E_local, H, I_local].
    Each rank's output is a partial sum (its slice of I, its experts): one all-reduce.

    Two formulations of the same function, fixed at construction (`sparse`):
    - sparse (the runtime's): the (token, expert) pairs are grouped by expert and each local expert runs only on its
      tokens, so compute follows top_k, not the number of experts;
    - dense (for export: no data-dependent shapes or control flow): every local expert runs on every token and is
      weighted by a [tokens, E] routing matrix that is zero for unselected experts."""

    def __init__(self, args: ModelArgs, d: Dist, linear: TorchKernel, sparse: bool = True):
        super().__init__()
        self.d, self.top_k, self.sparse = d, args.top_k, sparse
        experts, inner = args.num_experts // args.moe_ep_size, args.intermediate_size // args.moe_tp_size
        self.first, self.last = args.expert_offset, args.expert_offset + experts
        self.act = ACTIVATIONS[args.hidden_act]
        self.router_weight = nn.Parameter(torch.empty(args.num_experts, args.hidden_size, dtype=torch.float32))
        self.fc_weight = nn.Parameter(torch.empty(experts, 2 * inner, args.hidden_size))
        self.proj_weight = nn.Parameter(torch.empty(experts, args.hidden_size, inner))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, H] -> (weights [N, top_k] float32, the renormalized top-k probabilities; experts [N, top_k])."""
        probs = F.linear(x.float(), self.router_weight).softmax(dim=-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        return top / top.sum(dim=-1, keepdim=True), idx

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, H] -> [N, E] float32 weights: the renormalized top-k probabilities, zero elsewhere."""
        weights, idx = self.route(x)
        return torch.zeros(x.shape[0], self.router_weight.shape[0]).scatter(-1, idx, weights)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Local expert e on tokens x [n, H] -> [n, H]."""
        up, gate = F.linear(x, self.fc_weight[e]).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, self.proj_weight[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, H]
        flat = x.reshape(-1, x.shape[-1])  # [N, H]
        y = self._sparse(flat) if self.sparse else self._dense(flat)
        return tp_all_reduce(y.to(x.dtype), self.d).view_as(x)

    def _dense(self, flat: torch.Tensor) -> torch.Tensor:
        weights = self.routing(flat)[:, self.first:self.last]  # [N, E_local]
        up, gate = torch.einsum("nh,eoh->eno", flat, self.fc_weight).chunk(2, dim=-1)  # [E_local, N, I_local] each
        out = torch.einsum("eni,ehi->enh", self.act(gate) * up, self.proj_weight)  # [E_local, N, H]
        return torch.einsum("ne,enh->nh", weights, out.float())

    def _sparse(self, flat: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(flat)  # [N, top_k] each
        pair_token = torch.arange(flat.shape[0]).repeat_interleave(self.top_k)  # the (token, choice) pairs
        pair_expert, pair_weight = experts.flatten(), weights.flatten()
        local = (pair_expert >= self.first) & (pair_expert < self.last)  # this rank's experts only (moe_ep)
        order = torch.argsort(pair_expert[local], stable=True)  # pairs grouped by expert
        tokens, expert_ids, w = pair_token[local][order], pair_expert[local][order], pair_weight[local][order]
        counts = torch.bincount(expert_ids - self.first, minlength=self.last - self.first).tolist()
        y = torch.zeros(flat.shape, dtype=torch.float32)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = tokens[start: start + n]
                y.index_add_(0, rows, self.expert(e, flat[rows]).float() * w[start: start + n, None])
            start += n
        return y


def make_mlp(args: ModelArgs, d: Dist, linear: TorchKernel) -> nn.Module:
    """The MLP fixed by the model description: mixture of experts, gated, or plain."""
    if args.num_experts:
        return MoeMLP(args, d, linear)
    return (GatedMLP if args.gated_mlp else PlainMLP)(args, d, linear)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, d: Dist, linear: TorchKernel):
        super().__init__()
        self.attn_norm = make_norm(args, linear)
        self.attn = Attention(args, d, linear)
        self.mlp_norm = make_norm(args, linear)
        self.mlp = make_mlp(args, d, linear)
        # The kernel's one-call form of this forward (NativeKernel.fused_layer), set once the weights are loaded.
        self.fused = None

    @property
    def plain(self) -> bool:
        """Pre-norm with RMSNorms, plain attention (Attention.plain), a gated silu MLP and tp 1 (no all-reduce between
        a projection and its residual): the layer a kernel may compute in one call (TorchKernel.fused_layer)."""
        return (type(self) is DecoderLayer and self.attn.plain and self.attn.d.tp_size == 1
                and isinstance(self.mlp, GatedMLP) and self.mlp.act is F.silu
                and isinstance(self.attn_norm, RMSNorm) and isinstance(self.mlp_norm, RMSNorm))

    def forward(self, x, cos, sin, mask, cache, input_pos, kv_len):
        if self.fused is not None and x.shape[0] * x.shape[1] <= self.fused.MAX_ROWS:  # fixed per call shape
            return self.fused(x, cos, sin, cache, input_pos, kv_len)
        h = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, input_pos, kv_len)
        return h + self.mlp(self.mlp_norm(h))


class PostNormDecoderLayer(DecoderLayer):
    """Norms after the residual additions (OPT with do_layer_norm_before false)."""

    def forward(self, x, cos, sin, mask, cache, input_pos, kv_len):
        h = self.attn_norm(x + self.attn(x, cos, sin, mask, cache, input_pos, kv_len))
        return self.mlp_norm(h + self.mlp(h))


class SandwichDecoderLayer(DecoderLayer):
    """Norms on both sides of attention and MLP, outputs normed before the residual adds (Gemma2/3)."""

    def __init__(self, args: ModelArgs, d: Dist, linear: TorchKernel):
        super().__init__(args, d, linear)
        self.attn_post_norm = make_norm(args, linear)
        self.mlp_post_norm = make_norm(args, linear)

    def forward(self, x, cos, sin, mask, cache, input_pos, kv_len):
        h = x + self.attn_post_norm(self.attn(self.attn_norm(x), cos, sin, mask, cache, input_pos, kv_len))
        return h + self.mlp_post_norm(self.mlp(self.mlp_norm(h)))


class ParallelDecoderLayer(nn.Module):
    """Attention and MLP read the same input (GPT-NeoX: two norms; Phi, GPT-J: one shared norm)."""

    def __init__(self, args: ModelArgs, d: Dist, linear: TorchKernel):
        super().__init__()
        self.attn_norm = make_norm(args, linear)
        self.attn = Attention(args, d, linear)
        self.mlp_norm = make_norm(args, linear) if args.residual == "parallel" else None
        self.mlp = make_mlp(args, d, linear)

    def forward(self, x, cos, sin, mask, cache, input_pos, kv_len):
        a = self.attn_norm(x)
        m = a if self.mlp_norm is None else self.mlp_norm(x)
        return x + self.attn(a, cos, sin, mask, cache, input_pos, kv_len) + self.mlp(m)


class Embedding(nn.Module):
    """A table of `rows` (vocabulary or positions), replicated or sharded over tp by rows or columns (hidden)."""

    def __init__(self, args: ModelArgs, d: Dist, rows: int):
        super().__init__()
        self.args, self.d = args, d
        cols = args.hidden_size
        if args.use_parallel_embedding and args.embedding_sharding_dim == 0:
            rows = -(-rows // args.tp_size)
        elif args.use_parallel_embedding:
            cols = args.hidden_size // args.tp_size
        self.weight = nn.Parameter(torch.empty(rows, cols))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        a = self.args
        if not a.use_parallel_embedding or a.tp_size == 1:
            return F.embedding(tokens, self.weight)
        if a.embedding_sharding_dim == 1:
            return tp_all_gather(F.embedding(tokens, self.weight), self.d, dim=-1)
        start = self.d.tp_rank * self.weight.shape[0]
        local = tokens - start
        inside = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return tp_all_reduce(x, self.d)


class EngineModel(nn.Module):
    """One pipeline stage of the model on one tensor-parallel rank."""

    linear_weights = ("lm_head",)

    def __init__(self, args: ModelArgs, d: Dist, max_batch: int, max_seq: int, linear: TorchKernel | None = None,
                 max_input: int = 0):
        """`max_input` (the engine's max_input_len; 0: unknown) bounds sliding-window layers' caches to a ring of
        sliding_window + max_input slots: enough for a whole right-padded prefill (padding included) beside the
        window, and independent of max_seq."""
        super().__init__()
        linear = linear or TorchKernel()
        self.args, self.d, self.linear = args, d, linear
        self.embed = Embedding(args, d, args.vocab_size) if d.is_first_stage else None
        self.pos_embed = Embedding(args, d, args.max_positions) if d.is_first_stage and args.max_positions else None
        self.embed_norm = make_norm(args, linear) if d.is_first_stage and args.embedding_norm else None
        layer = {"sequential": DecoderLayer, "post_norm": PostNormDecoderLayer,
                 "sandwich": SandwichDecoderLayer}.get(args.residual, ParallelDecoderLayer)
        self.layers = nn.ModuleList(layer(args, d, linear) for _ in args.layers)
        self.sliding = [args.is_sliding(g) for g in args.layers]  # fixed per layer
        if args.alibi:  # this rank's heads' slopes (TP splits them by head), scaled once here
            local = slice(d.tp_rank * args.local_heads, (d.tp_rank + 1) * args.local_heads)
            self.register_buffer("alibi_slopes", alibi_slopes(args.num_heads, args.alibi_bias_max)[local] * args.alibi_scale,
                                 persistent=False)
        if d.is_last_stage:
            self.final_norm = make_norm(args, linear) if args.final_norm else nn.Identity()
            self.lm_head = nn.Parameter(torch.empty(args.vocab_padded // args.tp_size, args.hidden_size))
            self.lm_head_bias = _bias(args.lm_head_bias, args.vocab_padded // args.tp_size)
        dtype = DTYPES[args.dtype]
        ring = args.sliding_window + max_input if max_input and args.sliding_window else 0
        self.ring_slots = ring if 0 < ring < max_seq and any(self.sliding) else 0  # fixed per engine
        self.caches = [KVCache(max_batch, args.local_kv_heads, self.ring_slots if sliding and self.ring_slots else max_seq,
                               args.head_size, dtype, args.kv_cache_quant, ring=sliding and bool(self.ring_slots))
                       for sliding in self.sliding]
        self.length_dependent_rope = bool(args.rotary_dim) and rope_kind(args.rotary_scaling) in LENGTH_DEPENDENT_ROPE
        cos, sin = rope_tables(args, max_seq)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if args.rotary_base_local:  # sliding layers rotate with their own base, unscaled (Gemma3)
            cos, sin = rope_tables(replace(args, rotary_base=args.rotary_base_local, rotary_scaling=None), max_seq)
            self.register_buffer("rope_cos_local", cos, persistent=False)
            self.register_buffer("rope_sin_local", sin, persistent=False)

    def set_moe_formulation(self, sparse: bool) -> None:
        """Sparse MoE (only the selected experts run; the runtime's default) or dense (every expert on every token,
        no data-dependent shapes: what an exporter traces). Same function either way."""
        for module in self.modules():
            if isinstance(module, MoeMLP):
                module.sparse = sparse

    def load_weights(self, tensors) -> list[str]:
        """Take (name, tensor) pairs one at a time, each linear weight handed to the kernel as it arrives (so a
        kernel that re-lays weights out never holds two copies of the model); returns the names never given."""
        linear = {f"{prefix}.{n}" if prefix else n: (module, n) for prefix, module in self.named_modules()
                  for n in getattr(module, "linear_weights", ()) if n in module._parameters}
        expected = set(self.state_dict())
        quantized: dict[str, dict[str, torch.Tensor]] = {}  # linear name -> its integer values and scales
        for name, tensor in tensors:
            base, _, suffix = name.rpartition(".")
            if base in linear and suffix in QUANT_SUFFIXES:
                quantized.setdefault(base, {})[suffix] = tensor
                continue
            if name not in expected:
                raise KeyError(name)
            expected.discard(name)
            module_name, _, attr = name.rpartition(".")
            module = self.get_submodule(module_name)
            if name in linear and tensor.dtype in QUANTIZED_DTYPES:
                quantized.setdefault(name, {})["q"] = tensor
            elif name in linear:
                del module._parameters[attr]
                setattr(module, attr, self.linear.prepare(tensor))
            else:
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        for name, parts in quantized.items():
            self._set_quantized(name, parts)
        for layer in self.layers:
            if isinstance(layer, DecoderLayer):
                layer.fused = self.linear.fused_layer(layer)
        return sorted(expected)

    def _set_quantized(self, name: str, parts: dict[str, torch.Tensor]) -> None:
        from pipeline.quantize.engine_format import from_engine_tensors

        if "q" not in parts or "scale" not in parts:
            raise KeyError(f"{name} (quantized: needs its values and {name}.scale)")
        module_name, _, attr = name.rpartition(".")
        module = self.get_submodule(module_name)
        del module._parameters[attr]
        weight = from_engine_tensors(parts.pop("q"), parts)
        setattr(module, attr, self.linear.prepare_quantized(weight, self.args.act_quant, DTYPES[self.args.dtype]))

    def step(self, x: torch.Tensor, input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """x: tokens [B, T] on the first stage, else hidden states [B, T, H]; input_pos: [B, T] absolute positions.
        Attends to cache positions [0, kv_len); returns hidden states [B, T, H]."""
        if self.embed is not None:
            x = self.embed(x)
            if self.args.embedding_scale != 1.0:  # fixed per model (Gemma), rounded to the dtype as Gemma does
                x = x * torch.tensor(self.args.embedding_scale, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(input_pos)
        if self.embed_norm is not None:  # fixed per model (BLOOM)
            x = self.embed_norm(x)
        if self.length_dependent_rope:  # fixed per model (dynamic NTK, longrope)
            cos, sin = rope_for_positions(self.args, input_pos)
            cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
        else:
            cos = self.rope_cos[input_pos].unsqueeze(1).to(x.dtype)
            sin = self.rope_sin[input_pos].unsqueeze(1).to(x.dtype)
        full = (cos, sin, causal_mask(input_pos, kv_len))
        if self.args.alibi:  # fixed per model: the mask becomes an additive bias per head
            full = (cos, sin, alibi_bias(self.alibi_slopes, full[2], x.dtype))
        local = full
        if self.args.sliding_window:  # fixed per model: sliding layers get their own mask (and maybe RoPE)
            if self.args.rotary_base_local:
                cos = self.rope_cos_local[input_pos].unsqueeze(1).to(x.dtype)
                sin = self.rope_sin_local[input_pos].unsqueeze(1).to(x.dtype)
            window = self.args.sliding_window
            local = (cos, sin, ring_mask(input_pos, kv_len, self.ring_slots, window) if self.ring_slots
                     else causal_mask(input_pos, kv_len, window))
        for layer, cache, sliding in zip(self.layers, self.caches, self.sliding):
            x = layer(x, *(local if sliding else full), cache, input_pos, kv_len)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [..., H] -> float32 logits over the real vocabulary [..., V] (tp shards gathered, padding dropped)."""
        local = self.linear(self.final_norm(h), self.lm_head, self.lm_head_bias)
        if self.args.final_softcap:  # fixed per model (Gemma2/3)
            local = softcap(local, self.args.final_softcap)
        return tp_all_gather(local, self.d, dim=-1)[..., : self.args.vocab_size].float()


def causal_mask(input_pos: torch.Tensor, kv_len: int, window: int = 0) -> torch.Tensor:
    """[B, 1, T, kv_len]: a query at position p sees cache positions 0..p (each sequence has its own positions), or
    with a sliding window only the last `window` of them, p - window < key <= p."""
    keys = torch.arange(kv_len, device=input_pos.device)[None, None, :]
    pos = input_pos[:, :, None]
    visible = keys <= pos
    if window:  # fixed per call site (sliding layers)
        visible = visible & (keys > pos - window)
    return visible.unsqueeze(1)


def ring_mask(input_pos: torch.Tensor, kv_len: int, slots: int, window: int) -> torch.Tensor:
    """[B, 1, T, min(kv_len, slots)]: the sliding-window mask over a ring cache (position p in slot p % slots).
    Each sequence has written every position up to its highest one in this step (`last`), so slot s holds
    last - ((last - s) mod slots); a slot is visible when that position is >= 0 and within the query's window.
    Padding written beyond a sequence's end holds positions above `last` and computes as an older, invisible one:
    the ring is larger than the window by the longest padded prefill."""
    last = input_pos.max(dim=1, keepdim=True).values  # [B, 1]
    s = torch.arange(min(kv_len, slots), device=input_pos.device)[None, :]
    held = (last - torch.remainder(last - s, slots))[:, None, :]  # [B, 1, S]
    pos = input_pos[:, :, None]
    return ((held >= 0) & (held <= pos) & (held > pos - window)).unsqueeze(1)
