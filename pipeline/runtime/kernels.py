"""Matrix-multiply kernels for the CPU runtime's linear layers, chosen when an engine is loaded.

A kernel prepares each weight once at load (`prepare`, e.g. reordering it into the blocked layout oneDNN's GEMM
reads fastest) and then computes x @ w.T (+ b). Measured on this project's 2-core AMD EPYC development machines
(`python benchmarks/decode_speed.py`, SmolLM2-135M fp32): torch's default F.linear goes through MKL, whose sgemv
streams weights at ~16 GB/s there; numpy's OpenBLAS reaches ~38 GB/s at batch 1 but slows at batch 8 (it repacks the
weight on every call); oneDNN with pre-packed weights is close to OpenBLAS at batch 1 and twice as fast at batch 8.
So `auto` is `onednn` where torch has it, else `torch`. OpenBLAS's GEMV speed in isolation does not carry into the
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


KERNELS = {k.name: k for k in (TorchKernel, BlasKernel, OneDnnKernel)}


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


def choose_kernel(name: str, dtype: torch.dtype) -> TorchKernel:
    if name == "auto":
        name = "onednn" if onednn_supports(dtype) else "torch"
    if name not in KERNELS:
        raise ValueError(f"unknown linear kernel {name!r}; known: {sorted(KERNELS)}")
    if name == "blas" and dtype != torch.float32:
        raise ValueError("the blas kernel needs a float32 engine")
    if name == "onednn" and not onednn_supports(dtype):
        raise ValueError(f"the onednn kernel cannot run {str(dtype).removeprefix('torch.')} on this CPU "
                         "(oneDNN's bfloat16 GEMM needs AVX-512 or AVX-NE-CONVERT); use kernel=torch or auto")
    return KERNELS[name]()
