"""An existing TensorRT-LLM checkpoint as a source: ours, TensorRT-LLM's own, or ModelOpt's legacy export
(`producer: modelopt`). Converting it again reshards it to another mapping, re-types it, or quantizes it.

The directory is checked first as a whole (config against the schema, every rank file against the plan its config
implies: names, shapes, dtypes, files per rank), so a checkpoint whose rank files disagree with its mapping is one
error before any data is read. The source then presents *canonical* tensors (`Canon` names, whole, global layer
indices): reading one gathers that target's pieces from the ranks of its pipeline stage (a replicated tensor from
rank 0 only) and inverts the split (`checkpoint.unshard`). The converter binds canonical names to themselves, so the
writer, the quantizer and the calibrate stage work on it as on any other source; peak memory is one target.

A quantized checkpoint keeps its quantization: its stored integers and scales are gathered per quantized tensor
(unpacked where the stored form is packed) and resharded as they are. What cannot be done exactly is refused:
re-quantizing with another algorithm, dequantizing, re-typing (scales are stored in the model dtype), GPTQ's
kernel-specific weight layout, and mappings that would split int4 groups (the plan's own check).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from pipeline.checkpoint.layout import PlannedTensor, _derived_whole, plan
from pipeline.checkpoint.sharding import ShardContext
from pipeline.checkpoint.unshard import unshard
from pipeline.checkpoint.validate import check_against_config
from pipeline.convert.canonical import Canon, Dims, canonical_shape
from pipeline.convert.sources import register_source
from pipeline.convert.sources.base import SourceModel
from pipeline.convert.sources.files import fingerprint_safetensors, fingerprint_whole
from pipeline.errors import PipelineError

# config.json keys a TensorRT-LLM checkpoint may carry that our schema does not describe (ModelOpt's producer
# stamp, the writing rank of its legacy export); they are dropped from the retargeted config.
_FOREIGN_KEYS = ("producer", "rank")
# Tensors ModelOpt's legacy export adds beside kv_cache_scaling_factor (their max); not read.
_MODELOPT_EXTRA = (".attention.k_cache_scaling_factor", ".attention.v_cache_scaling_factor")


def _global_module(module: str, layer: int | None) -> str:
    """'transformer.layers.1.attention.qkv' at global layer 4 -> 'layers.4.attention.qkv' (mapping-independent)."""
    parts = module.split(".")
    if layer is not None and parts[:2] == ["transformer", "layers"]:
        return ".".join(["layers", str(layer), *parts[3:]])
    return module


def _unfinalize(qt, piece: torch.Tensor, what: str) -> torch.Tensor:
    """A stored rank piece of a scheme tensor back to the form it had before `finalize` (for resharding)."""
    from pipeline.quantize import schemes
    from pipeline.quantize.numerics import unpack_int4_rows

    if qt.finalize is None:
        return piece
    if qt.finalize is schemes._pack_rows:
        return unpack_int4_rows(piece)
    if qt.finalize is schemes._transpose:
        return piece.t().contiguous()
    raise PipelineError(f"{what}: stored in a GPU kernel's weight layout (GPTQ); resharding it is not supported "
                        "(convert the original model to the new mapping instead)")


@register_source("trtllm")
class TrtllmCheckpointSource(SourceModel):
    #: names are canonical tensors: the converter binds them to themselves, without source transforms
    canonical = True

    def __init__(self, path: Path):
        if not path.is_dir():
            raise PipelineError(f"model.path: {path} is not a directory (a TensorRT-LLM checkpoint holds config.json "
                                "and rank{N}.safetensors)")
        self.dir = path
        config_path = path / "config.json"
        if not config_path.is_file():
            raise PipelineError(f"TensorRT-LLM checkpoint {path}: config.json is missing")
        try:
            raw = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PipelineError(f"{config_path} is not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise PipelineError(f"{config_path} must hold a JSON object")
        self.producer = raw.get("producer")
        self.config = {k: v for k, v in raw.items() if k not in _FOREIGN_KEYS}
        self._check(config_path)
        from pipeline.convert.registry import get_spec

        self.spec = get_spec(self.config["architecture"])
        self.hf_config = {"architectures": [self.spec.architecture]}
        self.plans = plan(self.config, self.spec.layout)
        self.ctx = ShardContext.from_config(self.config)
        self.dims = Dims.from_config(self.config)
        q = self.config.get("quantization") or {}
        self.quantization = {k: v for k, v in q.items() if v is not None}
        self._handles: dict[int, Any] = {}
        self._index()
        self._cached: tuple[Any, dict[str, torch.Tensor]] | None = None

    # -- checks and indexes ----------------------------------------------------------------------------------------
    def _check(self, config_path: Path) -> None:
        if self.producer is not None:
            name = self.producer.get("name") if isinstance(self.producer, dict) else self.producer
            if name != "modelopt":
                raise PipelineError(f"{config_path}: producer {self.producer!r} is not one this reader knows "
                                    "(ModelOpt's legacy export says {'name': 'modelopt'})")
        problems = check_against_config(self.dir, self.config)
        if self.producer is not None:  # ModelOpt's legacy export also writes K and V scales for TensorRT-LLM < 0.17
            problems = [p for p in problems if not p.endswith(_MODELOPT_EXTRA)]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise PipelineError(f"TensorRT-LLM checkpoint {self.dir} is inconsistent: {problems[0]}{more}")

    def _index(self) -> None:
        """canonical name -> its target's key; target key -> (split, whole shapes, {tp_rank: (rank, name)})."""
        self._part_of: dict[str, tuple] = {}
        self._targets: dict[tuple, dict[str, Any]] = {}
        self._quant: dict[tuple, dict[str, Any]] = {}
        for p in self.plans:
            for t in p.tensors:
                if t.quant is None:
                    key = t.parts
                    entry = self._targets.setdefault(key, {"planned": t, "ranks": {}})
                    for part in t.parts:
                        self._part_of[part] = key
                else:
                    key = (_global_module(t.module, t.layer), t.quant.suffix)
                    entry = self._quant.setdefault(key, {"planned": t, "ranks": {}})
                    for part in t.parts:  # quantized parts are named (shapes known) but read only as stored
                        self._part_of.setdefault(part, None)
                entry["ranks"][p.tp_rank] = (p.rank, t.name)

    # -- SourceModel -------------------------------------------------------------------------------------------------
    def names(self) -> set[str]:
        return set(self._part_of)

    def shape(self, name: str) -> tuple[int, ...]:
        canon = next(c for c in Canon if c.per_layer and _matches(c, name) or c.value == name)
        return canonical_shape(canon, self.dims)

    def where(self, name: str) -> str:
        key = self._part_of.get(name)
        if key is None:
            return str(self.dir)
        rank, local = self._targets[key]["ranks"][0]
        return f"{self.dir / f'rank{rank}.safetensors'} ({local})"

    def read(self, name: str) -> torch.Tensor:
        key = self._part_of.get(name)
        if key is None:
            raise PipelineError(f"{name}: the TensorRT-LLM checkpoint {self.dir} holds it quantized "
                                f"({self.quantization.get('quant_algo')}); it is resharded as stored, never "
                                "dequantized or re-quantized")
        if self._cached is None or self._cached[0] != key:
            entry = self._targets[key]
            t: PlannedTensor = entry["planned"]
            shapes = [canonical_shape(_canon(c), self.dims) for c in t.canons]
            parts = unshard(lambda r: self._piece(entry, r), t.split, shapes, self.ctx, t.name)
            self._cached = None  # drop the previous target before holding this one
            self._cached = (key, dict(zip(t.parts, parts)))
        return self._cached[1][name]

    def fingerprint(self) -> dict[str, Any]:
        files = [fingerprint_whole(self.dir / "config.json")]
        files += [fingerprint_safetensors(self.dir / f"rank{p.rank}.safetensors") for p in self.plans]
        return {"format": "trtllm", "files": files}

    def tokenizer(self):
        tok_dir = self.dir / "tokenizer"
        if not tok_dir.is_dir():
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tok_dir)

    def close(self) -> None:
        self._handles.clear()
        self._cached = None

    # -- reading pieces -------------------------------------------------------------------------------------------
    def _file(self, rank: int):
        if rank not in self._handles:
            self._handles[rank] = safe_open(str(self.dir / f"rank{rank}.safetensors"), framework="pt")
        return self._handles[rank]

    def _piece(self, entry: dict[str, Any], tp_rank: int) -> torch.Tensor:
        rank, local = entry["ranks"][tp_rank]
        try:
            return self._file(rank).get_slice(local)[:]
        except Exception as e:
            raise PipelineError(f"cannot read {local} from {self.dir / f'rank{rank}.safetensors'} "
                                f"(truncated or corrupt?): {e}") from None

    # -- retargeting ------------------------------------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        return bool(self.quantization.get("quant_algo") or self.quantization.get("kv_cache_quant_algo"))

    def retarget(self, spec, dtype: str, mapping, quantization: Mapping[str, Any] | None) -> dict[str, Any]:
        """The checkpoint config for the new dtype, mapping and quantization (refusing what is not exact)."""
        from pipeline.quantize.schemes import quant_config

        cfg = copy.deepcopy(self.config)
        cfg.update(dtype=dtype, mapping=mapping.as_config(), use_parallel_embedding=mapping.use_parallel_embedding,
                   embedding_sharding_dim=mapping.embedding_sharding_dim)
        cfg.update(spec.forced_mapping_fields(cfg, mapping))
        requested = quantization or {}
        asked = bool(requested.get("quant_algo") or requested.get("kv_cache_quant_algo"))
        if not self.quantized:
            cfg["quantization"] = quant_config(requested) if asked else {"quant_algo": None,
                                                                          "kv_cache_quant_algo": None}
            return cfg
        have = self.config["quantization"]
        if asked:
            want = quant_config(requested)
            if {k: want.get(k) for k in ("quant_algo", "kv_cache_quant_algo", "group_size")} != \
                    {k: have.get(k) if k != "group_size" or want.get(k) is not None else None
                     for k in ("quant_algo", "kv_cache_quant_algo", "group_size")}:
                raise PipelineError(
                    f"the TensorRT-LLM checkpoint {self.dir} is already quantized (quant_algo="
                    f"{have.get('quant_algo')}, kv_cache_quant_algo={have.get('kv_cache_quant_algo')}, group_size="
                    f"{have.get('group_size')}); re-quantizing it to {want.get('quant_algo')} / "
                    f"{want.get('kv_cache_quant_algo')} would round already-rounded weights. Leave quantization "
                    "unset (quantization=none) to reshard it as it is, or convert the original model")
        if "GPTQ" in (have.get("quant_algo") or ""):
            raise PipelineError(f"the TensorRT-LLM checkpoint {self.dir} is {have['quant_algo']}: its weights are "
                                "stored in a GPU kernel's layout; resharding them is not supported (convert the "
                                "original GPTQ model to the new mapping instead)")
        if dtype != self.config["dtype"]:
            raise PipelineError(
                f"the TensorRT-LLM checkpoint {self.dir} is quantized ({have.get('quant_algo')}); its scales are "
                f"stored in dtype={self.config['dtype']}, and re-typing to {dtype} would round them: keep "
                f"dtype={self.config['dtype']}")
        return cfg

    def quantized_whole(self, planned: PlannedTensor, settings, resolve=None) -> list[torch.Tensor]:
        """A planned scheme tensor of the new mapping, gathered whole from the stored one (per part for ROWS)."""
        from pipeline.quantize.schemes import Kind

        key = (_global_module(planned.module, planned.layer), planned.quant.suffix)
        entry = self._quant.get(key)
        if entry is None:
            raise PipelineError(f"{planned.name}: the source checkpoint has no stored {key[1]} for {key[0]}")
        src: PlannedTensor = entry["planned"]
        qt = src.quant
        if qt.kind is Kind.SCALAR or not src.canons:
            return [_unfinalize(qt, self._piece(entry, 0), src.name)]
        canon_shapes = [canonical_shape(_canon(c), self.dims) for c in src.canons]
        shapes = [tuple(w.shape) for w in _derived_whole(qt, canon_shapes, settings)]
        return unshard(lambda r: _unfinalize(qt, self._piece(entry, r), src.name), src.split, shapes, self.ctx,
                       src.name)


def _canon(c) -> Canon:
    return c if isinstance(c, Canon) else Canon(c)


def _matches(canon: Canon, name: str) -> bool:
    prefix, _, suffix = canon.value.partition("{layer}")
    if not (name.startswith(prefix) and name.endswith(suffix)):
        return False
    middle = name[len(prefix): len(name) - len(suffix)]
    return middle.isdigit()


