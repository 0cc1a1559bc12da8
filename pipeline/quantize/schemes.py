"""TensorRT-LLM's quantized checkpoint formats as data: per algorithm, which tensors replace a linear layer's
`weight`, their dtypes, shapes and how they are split over tensor-parallel ranks, plus the function that computes
them from the float weight and the calibration statistics.

Terms:
- a *target* is one TensorRT-LLM linear weight (`attention.qkv`, `mlp.fc`, ...) built from canonical *parts*
  (q, k, v for qkv); quantized tensors are computed on the whole (unsplit) target, then split like the weight;
- `Kind.ROWS` tensors follow each part's output rows (the weight itself, per-row or per-group scales): they are split
  with the weight's rule (qkv by heads, column, row), except that 1-D per-row tensors of a row-parallel layer are
  replicated; `Kind.INPUT` tensors run along the input dim (AWQ/SmoothQuant factors): replicated for column-parallel
  layers and split for row-parallel ones; `Kind.SCALAR` tensors (per-tensor scales) are identical on every rank;
- `finalize` turns one rank's piece into its stored form (int4 packing, GPTQ's transposed kernel layout).

The table imports no tensor library: deciding what a recipe needs (statistics, the checkpoint's quantization object)
is part of computing stage keys, which a cached re-run does without torch; the formulas import it when they run.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Mapping

from pipeline.checkpoint.sharding import Split
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import torch

    from pipeline.quantize.algorithms import InputStats

# TensorRT-LLM's default exclusions when `exclude_modules` is null (a given list replaces them).
DEFAULT_EXCLUDES = ("*lm_head", "*router", "*vocab_embedding", "*position_embedding", "*block_embedding",
                    "*shared_expert_gate")
# Linear modules (by the end of their TensorRT-LLM name) that quantization replaces.
LINEAR_MODULES = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj", "lm_head")
# Modules that read the same input as another: they share its statistics (and AWQ/SmoothQuant factors).
SHARED_INPUT = {"mlp.gate": "mlp.fc"}


class Kind(str, Enum):
    ROWS = "rows"
    INPUT = "input"
    SCALAR = "scalar"


@dataclass(frozen=True)
class Settings:
    """The quantization recipe as the formulas need it."""

    dtype: torch.dtype  # the checkpoint's model dtype
    group_size: int = 128
    smoothquant_val: float = 0.5
    gptq_damp: float = 0.01
    awq_grid: int = 20
    awq_search: str = "coarse_to_fine"
    gptq_sm: int = 80


@dataclass(frozen=True)
class QTensor:
    suffix: str  # the tensor name after the module name (`weight`, `weights_scaling_factor`, ...)
    kind: Kind
    dtype: str  # "model" (the checkpoint dtype) or a torch dtype name
    # Whole shape: ROWS from (part_out, in), INPUT from in, SCALAR is (1,).
    shape: Callable[[int, int, Settings], tuple[int, ...]] = lambda out, inp, s: (1,)
    finalize: Callable[[torch.Tensor, Settings], torch.Tensor] | None = None

    def torch_dtype(self, settings: Settings) -> torch.dtype:
        import torch

        return settings.dtype if self.dtype == "model" else getattr(torch, self.dtype)

    def split(self, base: Split, whole_ndim: int) -> Split:
        if self.kind is Kind.SCALAR:
            return Split.REPLICATE
        if self.kind is Kind.INPUT:
            return Split.COLUMN if base is Split.ROW else Split.REPLICATE
        return Split.REPLICATE if base is Split.ROW and whole_ndim == 1 else base


# Quantize: (parts (whole, float32), prequant factor or None, stats, settings, what) -> suffix -> tensors
# (a list with one tensor per part for ROWS, one tensor otherwise).
QuantizeFn = Callable[[list["torch.Tensor"], "torch.Tensor | None", "InputStats | None", Settings, str],
                      dict[str, Any]]
# Smooth: (weights of every module reading this input, concatenated on dim 0; stats; settings; what) -> s (in,).
SmoothFn = Callable[["torch.Tensor", "InputStats", Settings, str], "torch.Tensor"]


@dataclass(frozen=True)
class Scheme:
    algo: str
    tensors: tuple[QTensor, ...]  # empty: weights stay float in the checkpoint, the build quantizes them
    stats: str  # statistics it needs: "none", "basic" (ranges) or "hessian" (ranges and H)
    quantize: QuantizeFn | None = None
    smooth: SmoothFn | None = None  # the factor s activations are divided by (stored as prequant = 1 / s)
    config: Mapping[str, Any] = field(default_factory=dict)  # fixed quantization-config fields
    grouped: bool = False  # writes group_size


SCHEMES: dict[str, Scheme] = {}


def scheme(s: Scheme) -> Scheme:
    SCHEMES[s.algo] = s
    return s


def get_scheme(algo: str) -> Scheme:
    if algo not in SCHEMES:
        raise PipelineError(f"quantization.quant_algo={algo} is not supported by the converter; supported: "
                            f"{sorted(SCHEMES)}")
    return SCHEMES[algo]


# -- shapes and finalizers ---------------------------------------------------------------------------------------
def _full(out: int, inp: int, s: Settings) -> tuple[int, ...]:
    return (out, inp)


def _per_row(out: int, inp: int, s: Settings) -> tuple[int, ...]:
    return (out,)


def _per_group(out: int, inp: int, s: Settings) -> tuple[int, ...]:
    return (out, inp // s.group_size)


def _input(out: int, inp: int, s: Settings) -> tuple[int, ...]:
    return (inp,)


def _pack_rows(t: torch.Tensor, s: Settings) -> torch.Tensor:
    if t.shape[0] % 2:
        raise PipelineError(f"int4 packing pairs output rows, but a rank holds {t.shape[0]} rows (odd)")
    from pipeline.quantize.numerics import pack_int4_rows

    return pack_int4_rows(t)


def _transpose(t: torch.Tensor, s: Settings) -> torch.Tensor:
    return t.t().contiguous()


def _gptq_weight(bits: int) -> Callable[[torch.Tensor, Settings], torch.Tensor]:
    """(out, in) signed values -> TensorRT-LLM's GPTQ weight: transposed to (in, out), int4 packed along the output
    dim, in the mixed-GEMM kernel's layout, viewed as a float16 container (in, out / 4) ((in, out / 2) for int8)."""

    def finalize(t: torch.Tensor, s: Settings) -> torch.Tensor:
        import torch

        from pipeline.quantize.numerics import pack_int4_cols

        q = t.t().contiguous()
        if q.shape[1] % (4 if bits == 4 else 2):
            raise PipelineError(f"GPTQ weights are stored as float16 containers of packed values: a rank's output "
                                f"width ({q.shape[1]}) must be a multiple of {4 if bits == 4 else 2}")
        from pipeline.quantize.mixed_gemm import check_shape, preprocess_weights_for_mixed_gemm

        try:
            check_shape(q.shape[0], q.shape[1], bits, s.gptq_sm)
        except ValueError as e:
            raise PipelineError(f"the GPTQ kernel layout for SM {s.gptq_sm} cannot take a rank's (in, out) = "
                                f"{tuple(q.shape)} weight: {e}") from None
        if q.is_meta:  # planning: the kernel layout permutes bytes and keeps the packed shape
            data = pack_int4_cols(q) if bits == 4 else q
        else:
            data = preprocess_weights_for_mixed_gemm(q, bits, s.gptq_sm)
        return data.contiguous().view(torch.float16)

    return finalize


WEIGHT_INT8 = QTensor("weight", Kind.ROWS, "int8", _full)
WEIGHT_INT4_PACKED = QTensor("weight", Kind.ROWS, "int8", _full, _pack_rows)
GROUP_SCALES = QTensor("weights_scaling_factor", Kind.ROWS, "model", _per_group)
PREQUANT = QTensor("prequant_scaling_factor", Kind.INPUT, "model", _input)
ACT_SCALE = QTensor("activation_scaling_factor", Kind.SCALAR, "float32")


# -- per-channel weight-only: float weights, quantized by the build ------------------------------------------------
# Current TensorRT-LLM builds quantize float qkv/dense/fc/gate/proj weights of a W8A16/W4A16 checkpoint on the build
# GPU (the stored int form is a GPU-specific kernel layout), so the checkpoint keeps them in the model dtype.
scheme(Scheme("W8A16", (), stats="none"))
scheme(Scheme("W4A16", (), stats="none"))


# -- AWQ ---------------------------------------------------------------------------------------------------------
def _awq_smooth(weight: torch.Tensor, stats: InputStats, s: Settings, what: str) -> torch.Tensor:
    from pipeline.quantize.algorithms import awq_scales

    return awq_scales(weight, stats, s.group_size, s.awq_grid, s.dtype, what, s.awq_search)


def _awq_weights(parts, prequant, stats, s: Settings, what: str) -> dict[str, Any]:
    from pipeline.quantize.numerics import symmetric_per_group

    scale_in = 1.0 / prequant.float()  # weights absorb what the activations lose: W' = W / prequant
    qs, scales = zip(*(symmetric_per_group(p * scale_in, 4, s.group_size, s.dtype, what) for p in parts))
    return {"weight": list(qs), "weights_scaling_factor": list(scales), "prequant_scaling_factor": prequant}


def _w4a8_awq(parts, prequant, stats, s: Settings, what: str) -> dict[str, Any]:
    import torch

    from pipeline.quantize.numerics import FP8_MAX

    out = _awq_weights(parts, prequant, stats, s, what)
    scale_in = 1.0 / prequant.float()
    w_amax = max(float((p * scale_in).abs().max()) for p in parts)
    x_amax = float((stats.absmax * prequant.float()).max())
    out["weights_scaling_factor_2"] = torch.tensor([max(w_amax, 1e-12) / FP8_MAX])
    out["activation_scaling_factor"] = torch.tensor([max(x_amax, 1e-12) / FP8_MAX])
    return out


_AWQ_TENSORS = (WEIGHT_INT4_PACKED, GROUP_SCALES, PREQUANT)
_AWQ_CONFIG = {"has_zero_point": False, "pre_quant_scale": True}
scheme(Scheme("W4A16_AWQ", _AWQ_TENSORS, "hessian", _awq_weights, _awq_smooth, _AWQ_CONFIG, grouped=True))
scheme(Scheme("W4A8_AWQ", _AWQ_TENSORS + (QTensor("weights_scaling_factor_2", Kind.SCALAR, "float32"), ACT_SCALE),
              "hessian", _w4a8_awq, _awq_smooth, _AWQ_CONFIG, grouped=True))


# -- GPTQ --------------------------------------------------------------------------------------------------------
def _gptq(bits: int):
    def quantize(parts, prequant, stats, s: Settings, what: str) -> dict[str, Any]:
        import torch

        from pipeline.quantize.algorithms import gptq_quantize

        whole = torch.cat(parts, dim=0)  # rows are independent; one pass over the fused weight shares H
        q, scale, zero = gptq_quantize(whole, stats, bits, s.group_size, s.gptq_damp, s.dtype, what)
        sizes = [p.shape[0] for p in parts]
        return {"weight": list(q.split(sizes)), "weights_scaling_factor": list(scale.split(sizes)),
                "zero": list(zero.split(sizes))}

    return quantize


def _gptq_tensors(bits: int) -> tuple[QTensor, ...]:
    return (QTensor("weight", Kind.ROWS, "int8", _full, _gptq_weight(bits)),
            QTensor("weights_scaling_factor", Kind.ROWS, "model", _per_group, _transpose),
            QTensor("zero", Kind.ROWS, "model", _per_group, _transpose))


_GPTQ_CONFIG = {"has_zero_point": True, "pre_quant_scale": False}
scheme(Scheme("W4A16_GPTQ", _gptq_tensors(4), "hessian", _gptq(4), None, _GPTQ_CONFIG, grouped=True))
scheme(Scheme("W8A16_GPTQ", _gptq_tensors(8), "hessian", _gptq(8), None, _GPTQ_CONFIG, grouped=True))


# -- SmoothQuant (ModelOpt int8_sq, non-plugin) ----------------------------------------------------------------------
def _sq_smooth(weight: torch.Tensor, stats: InputStats, s: Settings, what: str) -> torch.Tensor:
    from pipeline.quantize.algorithms import smoothquant_scales

    return smoothquant_scales(weight, stats, s.smoothquant_val)


def _sq(parts, prequant, stats, s: Settings, what: str) -> dict[str, Any]:
    import torch

    from pipeline.quantize.numerics import INT8_MAX, symmetric_per_channel

    scale_in = 1.0 / prequant.float()
    qs, scales = zip(*(symmetric_per_channel(p * scale_in, 8, INT8_MAX) for p in parts))
    x_amax = float((stats.absmax * prequant.float()).max())
    return {"weight": list(qs), "weights_scaling_factor": list(scales), "prequant_scaling_factor": prequant,
            "activation_scaling_factor": torch.tensor([max(x_amax, 1e-12) / INT8_MAX])}


scheme(Scheme("W8A8_SQ_PER_CHANNEL",
              (WEIGHT_INT8, QTensor("weights_scaling_factor", Kind.ROWS, "float32", _per_row), ACT_SCALE, PREQUANT),
              "basic", _sq, _sq_smooth))


# -- FP8 per tensor ----------------------------------------------------------------------------------------------
def _fp8(parts, prequant, stats, s: Settings, what: str) -> dict[str, Any]:
    import torch

    from pipeline.quantize.numerics import FP8_MAX, fp8_quantize

    w_scale = max(float(p.abs().max()) for p in parts) / FP8_MAX  # one scale for fused q, k, v
    w_scale = torch.tensor([max(w_scale, 1e-12)])
    return {"weight": [fp8_quantize(p, w_scale) for p in parts], "weights_scaling_factor": w_scale,
            "activation_scaling_factor": torch.tensor([max(float(stats.absmax.max()), 1e-12) / FP8_MAX])}


scheme(Scheme("FP8", (QTensor("weight", Kind.ROWS, "float8_e4m3fn", _full),
                      QTensor("weights_scaling_factor", Kind.SCALAR, "float32"), ACT_SCALE), "basic", _fp8))


# quant_algo -> bits of the algorithms that take a GPTQ source's integers as they are
KEEPS_SOURCE_INTEGERS = {"W4A16_GPTQ": 4, "W8A16_GPTQ": 8}


def needs_statistics(quantization: Mapping[str, Any] | None, is_prequantized: Callable[[], bool] | None = None) -> str:
    """'none', 'basic' or 'hessian': what the recipe's algorithms need from calibration. `is_prequantized` (asked
    only when it matters) says whether the source holds GPTQ integers, which GPTQ algorithms take as they are."""
    q = quantization or {}
    if (q.get("quant_algo") in KEEPS_SOURCE_INTEGERS and not q.get("kv_cache_quant_algo")
            and is_prequantized is not None and is_prequantized()):
        return "none"
    need = get_scheme(q["quant_algo"]).stats if q.get("quant_algo") else "none"
    if q.get("kv_cache_quant_algo") and need == "none":
        need = "basic"
    return need


# -- KV cache ------------------------------------------------------------------------------------------------------
KV_SCALE = QTensor("kv_cache_scaling_factor", Kind.SCALAR, "float32")
KV_CACHE_ALGOS = ("FP8", "INT8")


def check_kv_cache_algo(kv_algo: str | None) -> None:
    if kv_algo and kv_algo not in KV_CACHE_ALGOS:
        raise PipelineError(f"quantization.kv_cache_quant_algo={kv_algo} is not supported; supported: "
                            f"{', '.join(KV_CACHE_ALGOS)}")


def kv_cache_scale(kv_algo: str, qkv: InputStats, k_absmax: float, v_absmax: float) -> torch.Tensor:
    """The dequantization scale of one layer's KV cache: INT8 as TensorRT-LLM's converters compute it (the qkv
    output range / 127), FP8 as ModelOpt does (max of the k and v ranges / 448; ModelOpt then raises it to at least
    1.0, which we do not: the calibrated value uses the FP8 range fully)."""
    import torch

    from pipeline.quantize.numerics import FP8_MAX, INT8_MAX

    if kv_algo == "INT8":
        return torch.tensor([max(qkv.output_absmax, 1e-12) / INT8_MAX])
    if kv_algo == "FP8":
        return torch.tensor([max(k_absmax, v_absmax, 1e-12) / FP8_MAX])
    raise PipelineError(f"quantization.kv_cache_quant_algo={kv_algo} is not supported; supported: FP8, INT8")


# -- which modules are quantized -------------------------------------------------------------------------------------
def quantized_linear(weight_name: str, exclude_modules: list[str] | None) -> str | None:
    """The module of a linear layer's weight that quantization replaces (by name and exclusions), else None."""
    if not weight_name.endswith(".weight"):
        return None
    module = weight_name[: -len(".weight")]
    return module if is_linear(module) and not excluded(module, exclude_modules) else None


def is_linear(module: str) -> bool:
    return any(module == m or module.endswith("." + m) for m in LINEAR_MODULES)


def excluded(module: str, exclude_modules: list[str] | None) -> bool:
    patterns = DEFAULT_EXCLUDES if exclude_modules is None else exclude_modules
    return any(fnmatch.fnmatchcase(module, p) for p in patterns)


def stats_key(module_in_layer: str) -> str:
    """The statistics name of a module's input (`mlp.gate` reads what `mlp.fc` reads)."""
    return SHARED_INPUT.get(module_in_layer, module_in_layer)


def quant_config(q: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's `quantization` object for a recipe's quantization group (only the keys that apply)."""
    algo, kv = q.get("quant_algo"), q.get("kv_cache_quant_algo")
    out: dict[str, Any] = {"quant_algo": algo, "kv_cache_quant_algo": kv}
    if algo:
        s = get_scheme(algo)
        if s.grouped:
            out["group_size"] = q["group_size"]
        out.update(s.config)
        if algo.startswith("W8A8_SQ"):
            out["smoothquant_val"] = q["smoothquant_val"]
        if q.get("exclude_modules") is not None:
            out["exclude_modules"] = list(q["exclude_modules"])
    return out
