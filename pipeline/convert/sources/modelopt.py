"""ModelOpt's unified HF checkpoint (`export_hf_checkpoint`): an HF directory whose quantized linears carry their
integers and scales, described by `hf_quant_config.json` and/or `config.json["quantization_config"]` with
`quant_method: modelopt`.

Per quantized linear `X` (HF module name) ModelOpt stores `X.weight` (FP8 e4m3 / int8 / int4 packed in uint8: byte
(j, k) holds rows 2j (low nibble) and 2j+1 (high nibble), two's complement), `X.weight_scale`, and by algorithm
`X.weight_scale_2`, `X.input_scale`, `X.pre_quant_scale`; the KV cache scales are `k_proj.k_scale` /
`v_proj.v_scale`. They map onto TensorRT-LLM's quantized tensors as they are (`ALGORITHMS`): the integers and scales
the user calibrated are what lands in the checkpoint. Fused layers (q/k/v, gate/up) need one per-tensor scale:
where ModelOpt left different ones, the parts are brought to the largest as TensorRT-LLM's own loader does (FP8
only; other cases are refused). Modules ModelOpt left unquantized become `exclude_modules`. Algorithms TensorRT-LLM's
checkpoint cannot express on the cpu engine (NVFP4, MXFP4/8, block scales, ...) are refused by name.

The view presents `X.weight` (out, in) like a float checkpoint, so names bind as usual; the converter asks
`quantized_whole` for the quantized tensors of each TensorRT-LLM target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from pipeline.convert.sources import register_source
from pipeline.convert.sources.base import SourceModel
from pipeline.convert.sources.hf import HFSource
from pipeline.errors import PipelineError

# ModelOpt's algorithm name (hf_quant_config.json `quant_algo`) -> TensorRT-LLM's and the stored tensors it reads.
@dataclass(frozen=True)
class Algorithm:
    trtllm: str
    weight: str  # "fp8", "int8" or "int4" (packed)
    scales: tuple[str, ...]  # stored scale suffixes next to `weight`


ALGORITHMS: dict[str, Algorithm] = {
    "FP8": Algorithm("FP8", "fp8", ("weight_scale", "input_scale")),
    "W4A16_AWQ": Algorithm("W4A16_AWQ", "int4", ("weight_scale", "pre_quant_scale")),
    "W4A8_AWQ": Algorithm("W4A8_AWQ", "int4", ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")),
    "W8A8_SQ_PER_CHANNEL": Algorithm("W8A8_SQ_PER_CHANNEL", "int8", ("weight_scale", "input_scale",
                                                                        "pre_quant_scale")),
}
# Named so users learn why rather than read "unknown".
REFUSED = {
    "NVFP4": "NVFP4 (4-bit floats with FP8 block scales) has no cpu-engine kernel and needs TensorRT-LLM's block-scale "
             "swizzle",
    "NVFP4_AWQ": "NVFP4 AWQ needs NVFP4 kernels", "NVFP4_SVD": "NVFP4 SVDQuant needs NVFP4 kernels",
    "W4A8_NVFP4_FP8": "NVFP4 weights need NVFP4 kernels", "W4A16_NVFP4": "NVFP4 weights need NVFP4 kernels",
    "W4A8_MXFP4_FP8": "MXFP4 block scales are not expressible", "MXFP4": "MXFP4 block scales are not expressible",
    "MXFP8": "MXFP8 block scales are not expressible", "W4A16_MXFP4": "MXFP4 block scales are not expressible",
    "FP8_BLOCK_SCALES": "FP8 block scales are not expressible in the checkpoint the cpu engine reads",
    "FP8_PB_WO": "FP8 block scales are not expressible in the checkpoint the cpu engine reads",
    "FP8_PER_CHANNEL_PER_TOKEN": "FP8 per-channel/per-token has no cpu-engine kernel",
    "W8A16": "INT8 weight-only is quantized at build time by TensorRT-LLM (its stored form is GPU-specific)",
    "MIXED_PRECISION": "per-layer mixed algorithms are not supported",
}
KV_ALGORITHMS = ("FP8", "INT8")
QUANT_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "k_scale", "v_scale")


def read_quant_config(path: Path, hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """The `quantization` block of hf_quant_config.json, or the one config.json's quantization_config implies."""
    qfile = path / "hf_quant_config.json"
    if qfile.is_file():
        try:
            data = json.loads(qfile.read_text())
        except json.JSONDecodeError as e:
            raise PipelineError(f"{qfile} is not valid JSON ({e})") from None
        q = data.get("quantization") if isinstance(data, dict) else None
        if not isinstance(q, dict):
            raise PipelineError(f"{qfile}: no 'quantization' object")
        return q
    qc = hf_config.get("quantization_config") or {}
    if str(qc.get("quant_method", "")).lower() != "modelopt":
        raise PipelineError(f"{path}: not a ModelOpt export (no hf_quant_config.json, and config.json's "
                            "quantization_config does not say quant_method: modelopt)")
    kv = qc.get("kv_cache_quant_algo") or (qc.get("kv_cache_scheme") or {}).get("type")
    if isinstance(kv, str) and kv.lower() == "float":
        kv = "FP8"
    return {"quant_algo": qc.get("quant_algo"), "kv_cache_quant_algo": kv, "group_size": qc.get("group_size"),
            "exclude_modules": qc.get("ignore") or qc.get("exclude_modules") or []}


@register_source("modelopt")
class ModelOptSource(SourceModel):
    def __init__(self, path: Path):
        inner = HFSource(path)
        self.inner = inner
        self.hf_config = {k: v for k, v in inner.hf_config.items() if k != "quantization_config"}
        self.qcfg = read_quant_config(path, inner.hf_config)
        algo, kv = self.qcfg.get("quant_algo"), self.qcfg.get("kv_cache_quant_algo")
        if algo in REFUSED:
            raise PipelineError(f"{path}: ModelOpt quant_algo {algo} cannot be converted: {REFUSED[algo]}")
        if algo is not None and algo not in ALGORITHMS:
            raise PipelineError(f"{path}: ModelOpt quant_algo {algo!r} is not one this converter knows; supported: "
                                f"{sorted(ALGORITHMS)} (refused by name: {sorted(REFUSED)})")
        if kv is not None and kv not in KV_ALGORITHMS:
            raise PipelineError(f"{path}: ModelOpt kv_cache_quant_algo {kv!r} is not supported; supported: "
                                f"{list(KV_ALGORITHMS)}")
        self.algorithm = ALGORITHMS.get(algo) if algo else None
        self.kv_algo = kv
        names = inner.names()
        self.modules = {n[: -len(".weight_scale")] for n in names if n.endswith(".weight_scale")}
        if self.algorithm is None and self.modules:
            raise PipelineError(f"{path}: tensors such as {sorted(self.modules)[0]}.weight_scale are quantized but "
                                "the quantization config names no quant_algo")
        if self.algorithm is not None and not self.modules:
            raise PipelineError(f"{path}: the quantization config says quant_algo {algo} but no tensor carries a "
                                "weight_scale: the weights are not quantized (an export that failed or a float "
                                "model with a stray hf_quant_config.json)")
        for m in sorted(self.modules):
            for suffix in ("weight", *self.algorithm.scales):
                if suffix == "pre_quant_scale":
                    continue  # ModelOpt may fold it into the preceding norm: then absent (ones)
                if f"{m}.{suffix}" not in names:
                    raise PipelineError(f"ModelOpt {algo} checkpoint: {m}.{suffix} is missing "
                                        f"({inner.where(m + '.weight_scale')})")
        self._names = {n for n in names if n.rsplit(".", 1)[-1] not in QUANT_SUFFIXES}
        self._cache: tuple[Any, dict[str, Any]] | None = None

    # -- SourceModel ---------------------------------------------------------------------------------------------
    def names(self) -> set[str]:
        return set(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        shape = self.inner.shape(name)
        if self._module(name) and self.algorithm.weight == "int4":
            return (shape[0] * 2, shape[1])
        return shape

    def read(self, name: str) -> torch.Tensor:
        module = self._module(name)
        if module is None:
            return self.inner.read(name)
        raise PipelineError(f"{name}: ModelOpt stored it quantized ({self.qcfg.get('quant_algo')}); it converts "
                            "with its own integers and scales (leave quantization unset), never re-quantized")

    def where(self, name: str) -> str:
        return self.inner.where(name)

    def fingerprint(self) -> dict[str, Any]:
        fp = self.inner.fingerprint()
        qfile = self.inner.dir / "hf_quant_config.json"
        if qfile.is_file():
            from pipeline.convert.sources.files import fingerprint_whole

            fp["files"].append(fingerprint_whole(qfile))
        return {**fp, "format": "modelopt"}

    def tokenizer(self):
        return self.inner.tokenizer()

    def close(self) -> None:
        self.inner.close()

    def _module(self, name: str) -> str | None:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        return module if module in self.modules else None

    # -- the converter's hooks -------------------------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        return bool(self.algorithm or self.kv_algo)

    def stored_quantization(self, requested: Mapping[str, Any] | None, exclude: list[str]) -> dict[str, Any]:
        """The recipe's quantization group with the checkpoint's algorithm, group size and exclusions (a recipe
        asking for another algorithm is refused: that would re-quantize the user's integers)."""
        requested = dict(requested or {})
        want = {"quant_algo": self.algorithm.trtllm if self.algorithm else None, "kv_cache_quant_algo": self.kv_algo}
        for key, value in want.items():
            if requested.get(key) not in (None, value):
                raise PipelineError(f"the ModelOpt checkpoint is {key}={value}; quantization.{key}="
                                    f"{requested.get(key)} would re-quantize it (leave quantization unset)")
        out = {**requested, **want, "exclude_modules": exclude}
        if self.qcfg.get("group_size") is not None:
            out["group_size"] = int(self.qcfg["group_size"])
        out.setdefault("smoothquant_val", 0.5)
        out.setdefault("group_size", 128)
        return out

    def is_quantized_weight(self, hf_weight_name: str) -> bool:
        return self._module(hf_weight_name) is not None

    def quantized_whole(self, planned, settings, resolve: Callable[[str], str]) -> list[torch.Tensor]:
        """One planned scheme tensor (whole target: per part for per-row tensors) from the stored tensors of the HF
        modules the target fuses."""
        from pipeline.convert.canonical import Canon
        from pipeline.quantize.schemes import KV_SCALE

        if planned.quant is KV_SCALE:
            attn = resolve(Canon.ATTN_K.at(planned.layer)).rsplit(".", 2)[0]  # model.layers.N.self_attn
            return [self._kv_scale(attn)]
        key = (planned.layer, planned.module)
        if self._cache is None or self._cache[0] != key:
            modules = [resolve(c.at(planned.layer))[: -len(".weight")] for c in planned.canons]
            self._cache = (key, self._target_tensors(modules, planned.module))
        value = self._cache[1][planned.quant.suffix]
        return list(value) if isinstance(value, (list, tuple)) else [value]

    # -- per algorithm ------------------------------------------------------------------------------------------
    def _stored(self, module: str, suffix: str) -> torch.Tensor | None:
        name = f"{module}.{suffix}"
        return self.inner.read(name) if name in self.inner.names() else None

    def _weight_values(self, module: str) -> torch.Tensor:
        w = self.inner.read(f"{module}.weight")
        kind = self.algorithm.weight
        if kind == "int4":
            return unpack_modelopt_int4(w)
        if kind == "int8":
            return w.view(torch.int8) if w.dtype == torch.uint8 else w.to(torch.int8)
        return w.view(torch.float8_e4m3fn) if w.dtype in (torch.uint8, torch.int8) else w

    def _one_scale(self, modules: list[str], suffix: str, what: str) -> torch.Tensor:
        values = [self._stored(m, suffix).float().reshape(-1) for m in modules]
        if any(v.numel() != 1 for v in values):
            raise PipelineError(f"{modules[0]}.{suffix}: expected a per-tensor scale, got shape "
                                f"{tuple(values[0].shape)}")
        if any(not torch.equal(v, values[0]) for v in values[1:]):
            raise PipelineError(f"{what}: ModelOpt stored different {suffix} values for the fused modules "
                                f"{modules}; TensorRT-LLM needs one (re-export with ModelOpt's fused-layer resmoothing)")
        return values[0].reshape(1)

    def _target_tensors(self, modules: list[str], what: str) -> dict[str, Any]:
        algo = self.algorithm.trtllm
        weights = [self._weight_values(m) for m in modules]
        out: dict[str, Any] = {}
        if algo == "FP8":
            scales = [self._stored(m, "weight_scale").float().reshape(1) for m in modules]
            common = torch.stack(scales).max().reshape(1)
            # TensorRT-LLM's loader gives fused parts the largest scale and requantizes the others to it.
            out["weight"] = [w if torch.equal(s, common) else
                             (w.float() * s / common).to(torch.float8_e4m3fn) for w, s in zip(weights, scales)]
            out["weights_scaling_factor"] = common
            out["activation_scaling_factor"] = torch.stack(
                [self._stored(m, "input_scale").float().reshape(1) for m in modules]).max().reshape(1)
            return out
        out["weight"] = weights
        out["weights_scaling_factor"] = [self._stored(m, "weight_scale").float() for m in modules]
        if algo == "W8A8_SQ_PER_CHANNEL":
            out["weights_scaling_factor"] = [s.reshape(-1) for s in out["weights_scaling_factor"]]
        pre = [self._stored(m, "pre_quant_scale") for m in modules]
        if any(p is None for p in pre):
            if not all(p is None for p in pre):
                raise PipelineError(f"{what}: some fused modules of {modules} have pre_quant_scale, others not")
            out["prequant_scaling_factor"] = torch.ones(weights[0].shape[1])
        else:
            if any(not torch.equal(p, pre[0]) for p in pre[1:]):
                raise PipelineError(f"{what}: the fused modules {modules} have different pre_quant_scale; "
                                    "TensorRT-LLM needs one per input")
            out["prequant_scaling_factor"] = pre[0].float()
        if algo in ("W4A8_AWQ", "W8A8_SQ_PER_CHANNEL"):
            out["activation_scaling_factor"] = self._one_scale(modules, "input_scale", what)
        if algo == "W4A8_AWQ":
            out["weights_scaling_factor_2"] = self._one_scale(modules, "weight_scale_2", what)
        return out

    def _kv_scale(self, attn: str) -> torch.Tensor:
        found = [self._stored(f"{attn}.{proj}", s) for proj, s in (("k_proj", "k_scale"), ("v_proj", "v_scale"))]
        if any(f is None for f in found):
            raise PipelineError(f"ModelOpt KV cache {self.kv_algo}: {attn}.k_proj.k_scale / v_proj.v_scale missing")
        return torch.stack([f.float().reshape(()) for f in found]).max().reshape(1)


def unpack_modelopt_int4(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt's uint8 (out / 2, in) -> int8 (out, in): byte (j, k) holds rows 2j (low nibble), 2j + 1 (high)."""
    b = packed.view(torch.uint8).to(torch.int16)
    low, high = b & 0x0F, (b >> 4) & 0x0F
    vals = torch.stack([low, high], dim=1).reshape(packed.shape[0] * 2, packed.shape[1])
    return torch.where(vals > 7, vals - 16, vals).to(torch.int8)


__all__ = ["ModelOptSource", "ALGORITHMS", "REFUSED", "unpack_modelopt_int4", "SourceModel"]
