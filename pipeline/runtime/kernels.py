"""Matrix-multiply kernels for the CPU runtime's linear layers, chosen when an engine is loaded.

A kernel prepares each weight once at load (`prepare`, e.g. reordering it into the blocked layout oneDNN's GEMM
reads fastest) and then computes x @ w.T (+ b). Measured on this project's 2-core AMD EPYC development machines
(`python benchmarks/decode_speed.py`, SmolLM2-135M fp32): torch's default F.linear goes through MKL, whose sgemv
streams weights at ~16 GB/s there; numpy's OpenBLAS reaches ~38 GB/s at batch 1 but slows at batch 8 (it repacks the
weight on every call); oneDNN with pre-packed weights is close to OpenBLAS at batch 1 and twice as fast at batch 8.
So `auto` is `onednn` where torch has it, else `torch`; for float32 engines it is `native` where the compiled kernels
of pipeline.runtime.native load: their float32 GEMV streams weights faster than oneDNN at decode batch sizes and
falls back to MKL's GEMM for prefill (see NativeKernel). OpenBLAS's GEMV speed in isolation does not carry into the
engine: with `blas` as the kernel a SmolLM2 fp32 decode step took 265 ms against oneDNN's 51 (torch profile, same
command), the time going to the torch (OpenMP) ops that follow each BLAS call, whose threads contend with
OpenBLAS's own pool. Exporters (ONNX/TensorRT) use `torch`: the kernel is a
constructor argument of the model, never a global.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


class TorchKernel:
    name = "torch"
    # Quantized weights: the torch kernel multiplies the exactly dequantized weight (the reference); the others use
    # torch's integer weight-only kernels where they fit (see pipeline.runtime.quant_linear).
    fast_quantized = False

    def prepare(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def prepare_quantized(self, w, act_quant: str | None, dtype: torch.dtype):
        from pipeline.runtime.quant_linear import QuantLinear

        return QuantLinear(w, act_quant, dtype, self.fast_quantized, self)

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(w, torch.Tensor):  # a quantized linear: fixed per weight at load, not per input
            return w(x, b)
        return F.linear(x, w, b)

    def fused_layer(self, layer):
        """A callable computing `layer`'s whole forward for a few rows where this kernel has one (see
        NativeKernel.fused_layer), or None: the modules compute it (what the exporters trace)."""
        return None

    def attention(self, layer, qkv: torch.Tensor, cos, sin, mask, cache, input_pos, kv_len: int) -> torch.Tensor:
        """An attention layer's work between its two projections (`layer.attend`: RoPE, cache update, attention);
        a kernel may compute a layer whose `plain` is true in its own way."""
        return layer.attend(qkv, cos, sin, mask, cache, input_pos, kv_len)

    def gated_activation(self, fused: torch.Tensor, act, act_on_second: bool) -> torch.Tensor:
        """act(one half of each row of a gated MLP's fused [fc; gate] output) * the other half (`act_on_second`:
        the activation applies to the second half)."""
        fc, gate = fused.chunk(2, dim=-1)
        if act_on_second:
            fc, gate = gate, fc
        return act(fc) * gate

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """weight * x / sqrt(mean(x^2) + eps) over the last dim, computed in float32 (the reference; what the
        exporters trace)."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)


class BlasKernel(TorchKernel):
    """float32 through numpy's BLAS (w stays (out, in); numpy passes the transpose flag to BLAS)."""

    name = "blas"

    def __call__(self, x, w, b=None):
        if not isinstance(w, torch.Tensor):
            return w(x, b)
        lead = x.shape[:-1]
        out = torch.from_numpy(x.reshape(-1, x.shape[-1]).contiguous().numpy() @ w.numpy().T)
        out = out.reshape(*lead, w.shape[0])
        return out if b is None else out + b


class OneDnnKernel(TorchKernel):
    """oneDNN (MKL-DNN) GEMM on weights reordered once into its blocked layout."""

    name = "onednn"

    # The batch-size hint picks oneDNN's blocking; measured on SmolLM2-135M's shapes, 16 was as fast as any hint at
    # 1 row and at 8 rows (hint 1 was 20% slower at 1 row and 35% slower at 8).
    BATCH_HINT = 16
    fast_quantized = True

    def prepare(self, w):
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), self.BATCH_HINT)

    def __call__(self, x, w, b=None):
        if not isinstance(w, torch.Tensor):
            return w(x, b)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")


class NativeFloatLinear:
    """A float linear layer for the `native` kernel: the compiled GEMV (pipeline.runtime.native, its plain float
    formats: float32, or a 16-bit engine's half or bfloat16 weights widened as they are read) for up to MAX_ROWS input
    rows, torch's GEMM (F.linear) on the same weight for more (prefill). A 16-bit engine's activations enter the
    compiled call as float32 (exact) and its float32 sums are rounded to the engine's dtype once: float32
    accumulation of the 16-bit products, as torch's 16-bit CPU GEMM and TensorRT-LLM's 16-bit GEMMs accumulate."""

    MAX_ROWS = 8  # the compiled kernel reads the weights once per 8 rows
    FORMATS = {torch.float32: 3, torch.float16: 4, torch.bfloat16: 5}  # weight dtype -> compiled storage format

    def __init__(self, weight: torch.Tensor, kernels):
        self.weight, self.kernels = weight.contiguous(), kernels
        self.format = self.FORMATS[weight.dtype]
        self.ones = torch.ones(weight.shape[0], 1)  # the kernel's per-row scale: w * 1.0 is w exactly

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def native_op(self, bias: torch.Tensor | None = None):
        """The compiled call of this layer with its arguments bound (native LinearOp: this __call__ for up to
        MAX_ROWS rows; float32 only, as the fused decoder layer takes it)."""
        return self.kernels.LinearOp(*self._native_args(bias)) if self.format == 3 else None

    def _native_args(self, bias: torch.Tensor | None) -> tuple:
        """quant_linear's arguments after x for the plain float formats (scale 1), LinearOp's too."""
        return self.weight, self.format, self.weight.shape[1], self.ones, None, bias, None, None, 0

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.numel() > self.MAX_ROWS * x.shape[-1]:
            return F.linear(x, self.weight, bias)
        if x.dtype == torch.float32:
            return self.kernels.quant_linear(x, *self._native_args(bias))
        return self.kernels.quant_linear(x.float(), *self._native_args(bias)).to(x.dtype)


class FusedDecoderLayer:
    """A plain pre-norm decoder layer's forward at up to MAX_ROWS rows (tokens x positions) as one compiled call
    (native `decoder_layer`: the calls NativeKernel makes for the layer's modules, in their order, so the same bits).
    At batch 1 the modules' eight compiled calls and their Python frames cost ~40 us a layer."""

    MAX_ROWS = NativeFloatLinear.MAX_ROWS  # beyond it the float32 linears take MKL's GEMM

    def __init__(self, layer, ops: list, kernels):
        attn, mlp = layer.attn, layer.mlp
        a = attn.args
        qkv, dense, fc_gate, proj = ops
        self.kernels = kernels
        self.before_cache = (layer.attn_norm.weight, layer.attn_norm.eps, qkv)
        self.after_cache = (a.local_heads, a.local_kv_heads, attn.scale, dense, attn.dense_bias, layer.mlp_norm.weight,
                            layer.mlp_norm.eps, fc_gate, mlp.linear_first, torch_vector_run(), proj, mlp.proj_bias)

    def __call__(self, x, cos, sin, cache, input_pos, kv_len: int) -> torch.Tensor:
        return self.kernels.decoder_layer(x, *self.before_cache, cos, sin, cache.k, cache.v, input_pos, kv_len,
                                          *self.after_cache)


class NativeKernel(OneDnnKernel):
    """float32 weights: `NativeFloatLinear`, the compiled GEMV at decode batch sizes. `benchmarks/linear_kernels.py`
    (random weights of SmolLM2-135M's 120 linear shapes, 2-core AMD EPYC, 2 threads): 23-26 GB/s against oneDNN's
    packed GEMM's 17-19 GB/s at one row, 0.64-0.82x its time at 8 rows. float16 and bfloat16 weights take the same
    GEMV in their 16-bit storage (half the bytes; 16-bit engines ran torch's 16-bit GEMM, or oneDNN's bfloat16 one,
    before). Quantized weights: see __init__. float32 RMSNorms are one compiled call: torch's formula is seven ops,
    ~50 us for a decode step's 576 values on that machine (two norms per layer), the compiled call ~5 us. So is a
    plain layer's attention at decode widths (RoPE, the cache write and causal attention; `attend` is about fifteen
    ops, ~190 us a layer at batch 1), and a gated MLP's silu(fc) * gate (chunk, silu and multiply: ~25 us a layer at
    batch 1; the compiled call computes the same bits)."""

    name = "native"
    MAX_FUSED_POSITIONS = 8  # query positions per sequence the fused attention takes (decode); more: SDPA

    def __init__(self, dtype: torch.dtype = torch.float32):
        # Quantized weights of a 16-bit engine take torch's bfloat16 weight-only kernels only where oneDNN's bfloat16
        # GEMM runs (the `onednn` kernel's choice), else their exact dequantization (the `torch` kernel's): the
        # compiled integer kernels take float32 engines.
        self.fast_quantized = dtype == torch.float32 or onednn_supports(dtype)

    @functools.cached_property
    def kernels(self):
        from pipeline.runtime import native

        return native.load()

    def prepare(self, w):
        if w.dtype not in NativeFloatLinear.FORMATS:
            return super().prepare(w)
        return NativeFloatLinear(w, self.kernels)

    def rms_norm(self, x, weight, eps):
        if x.dtype != torch.float32 or weight.dtype != torch.float32:
            return super().rms_norm(x, weight, eps)
        return self.kernels.rms_norm(x, weight, eps)

    def gated_activation(self, fused, act, act_on_second):
        if act is not F.silu or fused.dtype != torch.float32:
            return super().gated_activation(fused, act, act_on_second)
        return self.kernels.silu_mul(fused, act_on_second, torch_vector_run())

    def fused_layer(self, layer) -> FusedDecoderLayer | None:
        """One compiled call for a whole DecoderLayer where every part of it has a compiled form here: a `plain`
        layer (RMSNorms, plain attention, a gated silu MLP, tp 1) with float32 norms and float32 or natively
        quantized linears; else None."""
        attn, mlp = layer.attn, layer.mlp
        if not (layer.plain and all(n.weight.dtype == torch.float32 for n in (layer.attn_norm, layer.mlp_norm))):
            return None
        linears = [(attn.qkv_weight, attn.qkv_bias), (attn.dense_weight, None), (mlp.fc_gate_weight, mlp.fc_gate_bias),
                   (mlp.proj_weight, None)]
        ops = [w.native_op(b) if hasattr(w, "native_op") else None for w, b in linears]
        return FusedDecoderLayer(layer, ops, self.kernels) if all(op is not None for op in ops) else None

    def attention(self, layer, qkv, cos, sin, mask, cache, input_pos, kv_len):
        if not (layer.plain and qkv.dtype == torch.float32 and qkv.shape[1] <= self.MAX_FUSED_POSITIONS):
            return super().attention(layer, qkv, cos, sin, mask, cache, input_pos, kv_len)
        a = layer.args
        return self.kernels.decode_attention(qkv, cos, sin, cache.k, cache.v, input_pos, kv_len, a.local_heads,
                                             a.local_kv_heads, layer.scale)


KERNELS = {k.name: k for k in (TorchKernel, BlasKernel, OneDnnKernel, NativeKernel)}


@functools.cache
def torch_vector_run() -> int:
    """float32 values per run of torch's vectorized elementwise loops on this CPU (two of its vectors: 16 where it
    dispatches to AVX2, 32 where to AVX-512; ATEN_CPU_CAPABILITY can lower it); a row's values after the last whole
    run take the scalar path. The compiled silu_mul runs the same to give torch's bits."""
    return 32 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 16


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@functools.cache
def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed GEMM runs `dtype` on this CPU. Its bfloat16 path needs AVX-512 (BW/VL/DQ) or
    AVX-NE-CONVERT, which AVX2-only machines lack; asking oneDNN itself once is the only reliable test."""
    if not onednn_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), OneDnnKernel.BATCH_HINT)
    except RuntimeError:
        return False
    return True


def native_available() -> bool:
    from pipeline.runtime import native

    return native.load() is not None


def choose_kernel(name: str, dtype: torch.dtype) -> TorchKernel:
    if name == "auto":
        name = "onednn" if onednn_supports(dtype) else "torch"
        if dtype in NativeFloatLinear.FORMATS and native_available():
            name = "native"
    if name not in KERNELS:
        raise ValueError(f"unknown linear kernel {name!r}; known: {sorted(KERNELS)}")
    if name == "blas" and dtype != torch.float32:
        raise ValueError("the blas kernel needs a float32 engine")
    if name == "native" and not (dtype in NativeFloatLinear.FORMATS and native_available()):
        raise ValueError("the native kernel needs the compiled kernels of pipeline.runtime.native, which are not "
                         "available here, and a float32, float16 or bfloat16 engine; use kernel=auto")
    if name == "onednn" and not onednn_supports(dtype):
        raise ValueError(f"the onednn kernel cannot run {str(dtype).removeprefix('torch.')} on this CPU "
                         "(oneDNN's bfloat16 GEMM needs AVX-512 or AVX-NE-CONVERT); use kernel=torch or auto")
    return NativeKernel(dtype) if name == "native" else KERNELS[name]()
