"""Pre-quantized GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum layout) seen through any source.

Such a checkpoint stores each quantized linear `X` as `X.qweight` (int32 (in * bits / 32, out): 32 / bits unsigned
values per word along the input dim, lowest bits first), `X.qzeros` (int32 (in / G, out * bits / 32), packed along
the output dim), `X.scales` (float16 (in / G, out)) and `X.g_idx` (int32 (in,), the group of each input channel). The
"gptq" (v1) checkpoint format stores each zero minus one; "gptq_v2" stores it as is.

The view presents `X.weight` (out, in) instead of those four, so names bind like any float checkpoint: reading it
gives the dequantized float weight ((q - zero) * scale), and `prequantized(name)` gives the integers and scales
themselves, which the converter writes as W4A16_GPTQ / W8A16_GPTQ without rounding anything again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.convert.sources.base import SourceModel
from pipeline.errors import PipelineError

PARTS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass
class PrequantizedWeight:
    q: torch.Tensor  # (out, in) int8: unsigned grid value - 2^(bits - 1)
    scale: torch.Tensor  # (out, in / G) float32
    zero: torch.Tensor  # (out, in / G) float32, in weight units: w = q * scale + zero
    bits: int
    group_size: int


def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> unsigned values, 32 / bits per word along `dim`, lowest bits first."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    w = words.to(torch.int64) & 0xFFFFFFFF
    vals = (w.unsqueeze(dim + 1) >> shifts.view(*([1] * (dim + 1)), per, *([1] * (w.dim() - dim - 1)))) & ((1 << bits) - 1)
    shape = list(words.shape)
    shape[dim] *= per
    return vals.reshape(shape)


class GPTQView(SourceModel):
    def __init__(self, inner: SourceModel, qcfg: dict[str, Any]):
        self.inner = inner
        self.hf_config = inner.hf_config
        self.bits = int(qcfg.get("bits", 4))
        self.group_size = int(qcfg.get("group_size", 128))
        self.zero_offset = 0 if qcfg.get("checkpoint_format", "gptq") == "gptq_v2" else 1
        if qcfg.get("desc_act"):
            raise PipelineError("quantization_config.desc_act=true in the source's config.json: act-order GPTQ "
                                "reorders input channels (g_idx), which TensorRT-LLM's GPTQ layout cannot express; "
                                "expected desc_act=false (re-quantize without act-order)")
        if self.bits not in (4, 8):
            raise PipelineError(f"GPTQ checkpoint with bits={self.bits}: only 4 and 8 bits convert to TensorRT-LLM")
        names = inner.names()
        self.modules = {n[: -len(".qweight")] for n in names if n.endswith(".qweight")}
        for m in sorted(self.modules):
            missing = [p for p in PARTS[:3] if f"{m}.{p}" not in names]
            if missing:
                raise PipelineError(f"GPTQ checkpoint: {m}.{missing[0]} is missing ({inner.where(m + '.qweight')})")
        self._names = {n for n in names if n.rsplit(".", 1)[0] not in self.modules or n.endswith(".bias")}
        self._names |= {f"{m}.weight" for m in self.modules}

    # -- the SourceModel interface ------------------------------------------------------------------------------
    def names(self) -> set[str]:
        return set(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        module = self._module(name)
        if module is None:
            return self.inner.shape(name)
        rows, out = self.inner.shape(f"{module}.qweight")
        return (out, rows * 32 // self.bits)

    def read(self, name: str) -> torch.Tensor:
        module = self._module(name)
        if module is None:
            return self.inner.read(name)
        p = self.prequantized(name)
        groups = p.scale.shape[1]
        q = p.q.float().reshape(p.q.shape[0], groups, -1)
        return (q * p.scale.unsqueeze(-1) + p.zero.unsqueeze(-1)).reshape(p.q.shape)

    def where(self, name: str) -> str:
        module = self._module(name)
        return self.inner.where(f"{module}.qweight" if module else name)

    def fingerprint(self) -> dict[str, Any]:
        return self.inner.fingerprint()

    def has_tokenizer(self) -> bool:
        return self.inner.has_tokenizer()

    def tokenizer(self):
        return self.inner.tokenizer()

    def close(self) -> None:
        self.inner.close()

    # -- pre-quantized access -----------------------------------------------------------------------------------
    def _module(self, name: str) -> str | None:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        return module if module in self.modules else None

    def prequantized(self, name: str) -> PrequantizedWeight | None:
        """The stored integers, scales and zeros of a quantized linear's weight (None for float tensors)."""
        module = self._module(name)
        if module is None:
            return None
        read = self.inner.read
        q_u = _unpack(read(f"{module}.qweight").to(torch.int32), self.bits, 0)  # (in, out)
        zeros = _unpack(read(f"{module}.qzeros").to(torch.int32), self.bits, 1) + self.zero_offset  # (in/G, out)
        scales = read(f"{module}.scales").float()  # (in/G, out)
        inp = q_u.shape[0]
        if f"{module}.g_idx" in self.inner.names():
            g_idx = read(f"{module}.g_idx").to(torch.int64)
            if not torch.equal(g_idx, torch.arange(inp) // self.group_size):
                raise PipelineError(f"{module}.g_idx in {self.where(name)} reorders input channels (act-order / "
                                    "desc_act GPTQ): TensorRT-LLM's GPTQ layout has no such permutation")
        if scales.shape[0] * self.group_size != inp:
            raise PipelineError(f"{module}.scales in {self.where(name)}: {scales.shape[0]} groups of "
                                f"group_size={self.group_size} do not cover {inp} input channels")
        offset = 1 << (self.bits - 1)
        q = (q_u - offset).to(torch.int8).t().contiguous()
        scale = scales.t().contiguous()
        zero = ((offset - zeros).float() * scales).t().contiguous()  # (q_u - z) s = (q_u - o) s + (o - z) s
        return PrequantizedWeight(q, scale, zero, self.bits, self.group_size)


def with_prequantized(source: SourceModel) -> SourceModel:
    """The source itself, or its GPTQ view when its config says it holds GPTQ-quantized weights."""
    qcfg = source.hf_config.get("quantization_config") or {}
    method = str(qcfg.get("quant_method", "")).lower()
    if not method:
        return source
    if method == "modelopt":
        raise PipelineError("the source is a ModelOpt export (quant_method: modelopt): read it with "
                            "model.source=modelopt, which keeps its integers and scales")
    if method != "gptq":
        raise PipelineError(f"the source is quantized with quant_method={method!r}; only GPTQ checkpoints convert "
                            "as they are (others: convert the float model with a quantization recipe)")
    return GPTQView(source, qcfg)
