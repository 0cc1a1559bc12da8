"""Quantized linear layers of the CPU engine.

A `QuantLinear` computes y = f(x') @ dequant(W)^T + b with x' = x * prequant (AWQ/SmoothQuant factors) and f the
activation quantization the algorithm implies (INT8 or FP8 fake-quantization with the calibrated per-tensor scale:
the values an INT8/FP8 GEMM would see). The weight path is either
- `exact`: W dequantized once at load (q * scale + zero, in float32) and multiplied by the float kernel: the
  reference dequantization of the checkpoint, to float rounding; or
- `native` (float32 engines): the compiled kernels of pipeline.runtime.native on the stored integer/FP8 values
  (int8, int4 repacked once into 32-value blocks, FP8 e4m3 bytes), every format, zero points and group sizes: each
  weight dequantized exactly as the reference does (q * scale, then + zero) and multiplied with float32
  activations, accumulated in float32; prequant and activation fake-quantization fused in (SmoothQuant's INT8
  activations times int8 weights are multiplied in integers, as an INT8 GEMM does). It reads the weights as
  stored (1 byte, or half a byte, per weight) and uses each decoded block for up to 8 rows (batch 8 reads the
  weights once); or
- `fast` (16-bit engines, or where the compiled kernels are unavailable): torch's CPU weight-only kernels on the
  integer values (`_weight_int8pack_mm` for per-channel int8, `_weight_int4pack_mm_for_cpu` for int4 in groups),
  which multiply in bfloat16 (fast only with 16-bit activations, as TensorRT-LLM's weight-only GEMMs are). Weights
  they cannot take (FP8 values, per-channel int8 with zero points, group sizes outside 32..256) use the exact path.
Which of these runs is the kernel's choice (`fast_quantized` of pipeline.runtime.kernels): the `torch` kernel, which
the exporters use, always takes the exact path.
"""

from __future__ import annotations

import torch

from pipeline.quantize.engine_format import EngineQuant
from pipeline.quantize.numerics import dequantize_groups, fake_quant_fp8, fake_quant_int8

INT4_GROUPS = (256, 128, 64, 32)  # group sizes the CPU int4 kernel takes
FAST_DTYPE = torch.bfloat16
NATIVE_FORMATS = {8: 0, 4: 1, 0: 2}  # bits -> the compiled kernel's storage format (int8, int4 blocks, fp8)
NATIVE_ACT = {None: 0, "int8": 1, "fp8": 2}
NATIVE_BLOCK = 32  # int4 values per 16-byte block of the compiled kernel


class QuantLinear:
    def __init__(self, w: EngineQuant, act_quant: str | None, dtype: torch.dtype, fast: bool, float_kernel):
        self.prequant = None if w.prequant is None else w.prequant.to(dtype)
        self.act_scale = w.act_scale
        self.act = {"int8": fake_quant_int8, "fp8": fake_quant_fp8}.get(act_quant) if w.act_scale is not None else None
        self.out_features = w.q.shape[0]
        self.mode = None
        if fast:
            self.mode = "native" if dtype == torch.float32 and _native() is not None else self._fast_mode(w)
        if self.mode == "native":
            self._prepare_native(w, act_quant)
        elif self.mode == "int8":
            self.q, self.scale = w.q.contiguous(), w.scale[:, 0].to(FAST_DTYPE)
        elif self.mode == "int4":
            self._prepare_int4(w)
        else:
            self.float_kernel = float_kernel
            self.weight = float_kernel.prepare(self._dequantized(w).to(dtype))

    @staticmethod
    def _fast_mode(w: EngineQuant) -> str | None:
        if w.bits == 8 and w.zero is None and w.scale.shape[1] == 1:
            return "int8"
        if w.bits == 4 and _int4_group(w) is not None:
            return "int4"
        return None

    @staticmethod
    def _dequantized(w: EngineQuant) -> torch.Tensor:
        return dequantize_groups(w.q.float() if w.bits == 0 else w.q, w.scale, w.zero)

    def _prepare_int4(self, w: EngineQuant) -> None:
        group = _int4_group(w)
        in_features = w.q.shape[1]
        # Per-channel (or coarser) scales are repeated over the kernel's groups: the same dequantized weight.
        reps = (in_features // group) // w.scale.shape[1]
        scale = w.scale.repeat_interleave(reps, dim=1)
        zero = torch.zeros_like(scale) if w.zero is None else w.zero.repeat_interleave(reps, dim=1)
        # The kernel reads unsigned nibbles u and computes (u - 8) * scale + zero: u = q + 8 is our q * scale + zero.
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((w.q.to(torch.int32) + 8).contiguous(), 1)
        self.group = group
        self.scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(FAST_DTYPE)

    def _prepare_native(self, w: EngineQuant, act_quant: str | None) -> None:
        self.kernels = _native()
        self.in_features = w.q.shape[1]
        self.format = NATIVE_FORMATS[w.bits]
        if w.bits == 4:
            self.packed = pack_int4_blocks(w.q)
        else:
            self.packed = w.q.contiguous().view(torch.int8 if w.bits == 8 else torch.uint8)
        self.scale = w.scale.float().contiguous()
        self.zero = None if w.zero is None else w.zero.float().contiguous()
        self.native_act = NATIVE_ACT.get(act_quant, 0) if w.act_scale is not None else 0
        self.native_prequant = None if w.prequant is None else w.prequant.float().contiguous()
        self.native_act_scale = None if w.act_scale is None else w.act_scale.float().reshape(1).contiguous()

    def native_op(self, bias: torch.Tensor | None = None):
        """This layer's compiled call with its arguments bound (native LinearOp: what this __call__ computes in the
        native mode), or None in another mode."""
        return self.kernels.LinearOp(*self._native_args(bias)) if self.mode == "native" else None

    def _native_args(self, bias: torch.Tensor | None) -> tuple:
        """quant_linear's arguments after x (LinearOp's, in the same order)."""
        return (self.packed, self.format, self.in_features, self.scale, self.zero, bias, self.native_prequant,
                self.native_act_scale, self.native_act)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "native":
            return self.kernels.quant_linear(x, *self._native_args(bias))
        if self.prequant is not None:
            x = x * self.prequant
        if self.act is not None:
            x = self.act(x, self.act_scale)
        if self.mode is None:
            return self.float_kernel(x, self.weight, bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(FAST_DTYPE)
        if self.mode == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scale_zero)
        y = y.to(x.dtype).reshape(*lead, self.out_features)
        return y if bias is None else y + bias


def _int4_group(w: EngineQuant) -> int | None:
    """The largest kernel group size that tiles each of the weight's scale groups exactly."""
    width = w.q.shape[1] // w.scale.shape[1]
    return next((g for g in INT4_GROUPS if width % g == 0), None)


def pack_int4_blocks(q: torch.Tensor) -> torch.Tensor:
    """(out, in) int4 values -> (out, ceil(in / 32) * 16) uint8 for the compiled kernel: per block of 32 values, byte
    j holds value j + 8 in its low nibble and value j + 16 + 8 in its high nibble (the input padded with zeros)."""
    out, width = q.shape
    padded = -(-width // NATIVE_BLOCK) * NATIVE_BLOCK
    u = torch.full((out, padded), 8, dtype=torch.uint8)
    u[:, :width] = (q.to(torch.int16) + 8).to(torch.uint8)
    u = u.reshape(out, padded // NATIVE_BLOCK, 2, NATIVE_BLOCK // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(out, padded // 2).contiguous()


def _native():
    from pipeline.runtime import native

    return native.load()
