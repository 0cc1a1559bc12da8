"""Source model -> TensorRT-LLM checkpoint, streamed tensor by tensor.

1. The ArchSpec turns the HF config into the TensorRT-LLM config, which is schema-checked.
2. `layout.plan` lists every rank's tensors (names, shapes, dtypes) from that config alone.
3. `bind` maps every needed canonical tensor to a source tensor and checks, before any data is read, that nothing
   is missing, nothing is left unmapped, and every shape is what the config implies. A canonical tensor with an
   expert dimension may come from one source tensor per expert (an `{expert}` template): it is stacked while read.
4. Per pipeline stage, one file per tp rank is opened with its header written from the plan; each target tensor is
   read once (its canonical parts), cast, and each rank's piece is streamed into its file. Peak memory is about one
   tensor (plus its fused parts), not the model and not the model times the number of ranks.
5. The set of written names per rank is compared with the plan.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from tqdm import tqdm

from pipeline import faults
from pipeline.checkpoint.layout import DTYPES, RankPlan, plan
from pipeline.checkpoint.safetensors_stream import StreamingSafetensorsWriter
from pipeline.checkpoint.sharding import ShardContext, shard
from pipeline.convert.canonical import Canon, Dims, canonical_shape
from pipeline.convert.registry import ArchSpec, MappingArgs, SourceName, Transform, get_spec
from pipeline.convert.sources.base import SourceModel
from pipeline.errors import PipelineError
from pipeline.quantize.schemes import Settings, check_kv_cache_algo, get_scheme, needs_statistics, quant_config
from pipeline.quantize.stats import StatsReader
from pipeline.quantize.writer import TargetQuantizer
from pipeline.schemas import validate


@dataclass
class ConvertResult:
    config: dict[str, Any]
    written: dict[int, list[str]]  # rank -> tensor names, in file order
    bytes_written: int


def resolve_architecture(hf: Mapping[str, Any], override: str | None) -> str:
    if override:
        return override
    archs = hf.get("architectures") or []
    if not archs:
        raise PipelineError("the HF config has no 'architectures' list; set model.architecture to choose a converter")
    return archs[0]


@dataclass(frozen=True)
class Bound:
    """Where one canonical tensor comes from: one source tensor, or one per expert (stacked on a new dim 0)."""

    names: tuple[str, ...]
    transform: Transform | None
    stacked: bool = False
    joined: tuple[str, ...] = ()  # read with names[0] and combined by `join` (SourceName.joined)
    join: Callable[[list[torch.Tensor], Mapping[str, Any]], torch.Tensor] | None = None

    def combined(self, tensors: list[torch.Tensor], cfg: Mapping[str, Any]) -> torch.Tensor:
        """names[0]'s tensor (first) joined with the `joined` ones, then transformed."""
        tensor = self.join(tensors, cfg) if self.join else tensors[0]
        return self.transform(tensor, cfg) if self.transform else tensor


def _alternatives(spec: ArchSpec, canon: Canon, source: SourceModel | None = None) -> list[SourceName]:
    if getattr(source, "canonical", False):  # the source holds canonical tensors already (a TensorRT-LLM checkpoint)
        return [SourceName(canon.value)]
    entry = spec.source_names.get(canon) or ()
    default = spec.transforms.get(canon)
    return [a if isinstance(a, SourceName) else SourceName(a, default)
            for a in ((entry,) if isinstance(entry, (str, SourceName)) else entry)]


def _expand(alt: SourceName, layer: int | None, experts: int) -> tuple[str, ...]:
    if "{expert}" in alt.template:
        return tuple(alt.template.format(layer=layer, expert=e) for e in range(experts))
    return (alt.template.format(layer=layer),)


def bind(spec: ArchSpec, source: SourceModel, cfg: Mapping[str, Any], plans: list[RankPlan]) -> dict[str, Bound]:
    """Canonical name -> its source tensor(s) for every canonical tensor the plan needs; fail on anything
    unaccounted, and check every shape (after transforms, per expert for stacked ones) before any data is read."""
    dims = Dims.from_config(cfg)
    tied = not getattr(source, "canonical", False) and spec.tied_embeddings(source.hf_config)
    needed = {part for p in plans for t in p.tensors for part in t.parts}
    available = source.names()
    binding, missing = {}, []
    for canon in Canon:
        layers = range(dims.layers) if canon.per_layer else [None]
        for layer in layers:
            name = canon.at(layer)
            if name not in needed:
                continue
            source_canon = Canon.VOCAB_EMBED if (canon is Canon.LM_HEAD and tied) else canon
            alts = [(a, _expand(a, layer, dims.experts)) for a in _alternatives(spec, source_canon, source)]
            chosen = next(((a, n) for a, n in alts if n and n[0] in available
                           and all(j.format(layer=layer) in available for j in a.joined)), alts[0] if alts else None)
            absent = ([n for n in (*chosen[1], *(j.format(layer=layer) for j in chosen[0].joined)) if n not in available]
                      if chosen else ["<no source name>"])
            if absent or not chosen[1]:
                missing.append(f"{(absent or ['<no expert>'])[0]} (for {name})")
                continue
            alt, names = chosen
            bound = Bound(names, alt.transform, stacked="{expert}" in alt.template,
                          joined=tuple(j.format(layer=layer) for j in alt.joined), join=alt.join)
            want = canonical_shape(canon, dims)
            for src in (*names, *bound.joined):
                if source.is_float(src) is False:
                    raise PipelineError(f"tensor {src} in {source.where(src)} is stored as integers; expected a "
                                        f"floating-point weight (for {name})")
            for src in names:
                # e.g. one slice of a fused source tensor, or a joined one: check what it will produce
                got = bound.combined([torch.empty(source.shape(n), device="meta") for n in (src, *bound.joined)],
                                     cfg).shape
                if tuple(got) != (want[1:] if bound.stacked else want):
                    raise PipelineError(
                        f"tensor {src} in {source.where(src)} has shape {tuple(got)}, expected "
                        f"{want[1:] if bound.stacked else want} from the config (hidden_size={dims.hidden}, "
                        f"heads={dims.heads}, kv_heads={dims.kv_heads}, head_size={dims.head_size}, "
                        f"intermediate_size={dims.intermediate}, vocab_size={dims.vocab}, num_experts={dims.experts})"
                    )
            binding[name] = bound
    if missing:
        raise PipelineError(f"{len(missing)} tensor(s) missing from the source, first: {missing[0]}")
    if not getattr(source, "canonical", False):  # a checkpoint's quantized parts are read as stored, not bound
        _check_unmapped(spec, source, cfg, {n for b in binding.values() for n in (*b.names, *b.joined)}, tied)
    return binding


def _check_unmapped(spec: ArchSpec, source: SourceModel, cfg: Mapping[str, Any], used: set[str], tied: bool) -> None:
    layers = range(cfg["num_hidden_layers"])
    known = set(used)
    for template in spec.dropped:
        known.update(template.format(layer=i) for i in layers)
    if tied and Canon.LM_HEAD in spec.source_names:  # some tied checkpoints also store the head; not needed
        known.update(a.template for a in _alternatives(spec, Canon.LM_HEAD))
    unmapped = sorted(source.names() - known)
    if unmapped:
        raise PipelineError(
            f"{len(unmapped)} source tensor(s) not mapped by the {spec.architecture} converter, first: {unmapped[0]} "
            f"in {source.where(unmapped[0])} (does the config describe these weights?)"
        )


@dataclass
class Prepared:
    """Everything known before any tensor data is read: the checkpoint config, every rank's plan, the binding."""

    spec: ArchSpec
    config: dict[str, Any]
    plans: list[RankPlan]
    binding: dict[str, Bound]
    # The quantization the checkpoint gets (a pre-quantized source's own algorithm and exclusions when it has one).
    quantization: Mapping[str, Any] | None = None

    @property
    def bytes(self) -> int:
        """Bytes of tensor data the rank files will hold."""
        return sum(math.prod(t.shape) * torch.empty((), dtype=t.dtype).element_size()
                   for p in self.plans for t in p.tensors)


def prepare(source: SourceModel, dtype: str, mapping: MappingArgs, architecture: str | None = None,
            quantization: Mapping[str, Any] | None = None) -> Prepared:
    """Config, plan and binding from the source's config and tensor shapes alone: every check that needs no
    tensor data (mapping fits, shapes, quantization group sizes), cheap enough to run before any stage starts."""
    spec = get_spec(resolve_architecture(source.hf_config, architecture))
    if mapping.pp_size > 1 and not spec.supports_pp:
        raise PipelineError(f"{spec.architecture}: TensorRT-LLM's model has no pipeline parallelism for this "
                            f"architecture; use mapping.pp_size=1 (got {mapping.pp_size})")
    if hasattr(source, "retarget"):  # an existing checkpoint: its config, retargeted (refusing what is not exact)
        cfg = source.retarget(spec, dtype, mapping, quantization)
    else:
        cfg = _trtllm_config(spec, source, dtype, mapping)
        if hasattr(source, "stored_quantization"):  # pre-quantized (ModelOpt): its algorithm and exclusions
            quantization = source.stored_quantization(quantization, _stored_exclusions(spec, source, cfg, mapping))
        if quantization:
            check_kv_cache_algo(quantization.get("kv_cache_quant_algo"))
            cfg["quantization"] = quant_config(quantization)
    where = getattr(source, "config_path", None) or "the source config"
    try:
        validate(cfg, "checkpoint_config", what="checkpoint config.json")
    except PipelineError as e:
        raise PipelineError(f"{where}: {e}") from None
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if heads % kv_heads:
        raise PipelineError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads="
                            f"{kv_heads} (each KV head serves a whole group of query heads)")
    plans = plan(cfg, spec.layout)
    binding = bind(spec, source, cfg, plans)
    return Prepared(spec, cfg, plans, binding, quantization)


def _trtllm_config(spec: ArchSpec, source: SourceModel, dtype: str, mapping: MappingArgs) -> dict[str, Any]:
    """The architecture's config mapping, with a missing or mistyped source config key named as such."""
    where = getattr(source, "config_path", None) or "the source config"
    try:
        return spec.trtllm_config(source.hf_config, dtype, mapping)
    except KeyError as e:
        raise PipelineError(f"{where}: required key {e.args[0]!r} is missing (the {spec.architecture} converter "
                            "needs it)") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        bad = {k: v for k, v in source.hf_config.items()
               if isinstance(v, (str, list, dict, type(None))) and k in _NUMERIC_KEYS}
        hint = f"; e.g. {next(iter(bad))}={next(iter(bad.values()))!r} is not a number" if bad else ""
        raise PipelineError(f"{where}: the {spec.architecture} config has a value of the wrong type or an "
                            f"impossible value ({e}){hint}") from None


_NUMERIC_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "vocab_size", "max_position_embeddings", "head_dim", "rms_norm_eps", "rope_theta", "n_embd", "n_head",
                 "n_layer", "n_positions", "ffn_dim")


def convert(
    source: SourceModel,
    out_dir: Path,
    dtype: str,
    mapping: MappingArgs,
    architecture: str | None = None,
    progress: bool = True,
    quantization: Mapping[str, Any] | None = None,
    stats_dir: Path | None = None,
    check_finite: bool = True,
) -> ConvertResult:
    """Write `config.json` and `rank{N}.safetensors` for the whole mapping into `out_dir`. `quantization` is the
    recipe's quantization group; `stats_dir` the calibration artifact when its algorithms need one; `check_finite`
    refuses tensors holding NaN or Inf."""
    prepared = prepare(source, dtype, mapping, architecture, quantization)
    spec, cfg, plans, binding = prepared.spec, prepared.config, prepared.plans, prepared.binding
    quantization = prepared.quantization
    if check_finite:
        source = _FiniteChecked(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = ShardContext.from_config(cfg)
    quantizer = _quantizer(spec, source, binding, cfg, quantization, stats_dir)
    written: dict[int, list[str]] = {}
    total = sum(len(p.tensors) for p in plans if p.tp_rank == 0)
    bytes_written = 0
    with tqdm(total=total, desc=f"convert tp{mapping.tp_size} pp{mapping.pp_size}", unit="tensor", disable=not progress) as bar:
        for pp_rank in range(mapping.pp_size):
            stage = [p for p in plans if p.pp_rank == pp_rank]
            bytes_written += _write_stage(stage, source, binding, cfg, ctx, out_dir, written, bar, quantizer)
    _check_complete(plans, written)
    if "GPTQ" in (cfg["quantization"].get("quant_algo") or ""):
        from pipeline.engine.cpu import QUANT_LAYOUT_FILE

        (out_dir / QUANT_LAYOUT_FILE).write_text(json.dumps({"gptq_sm": quantizer.settings.gptq_sm}) + "\n")
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return ConvertResult(cfg, written, bytes_written)


class FloatCheckpointView:
    """The single-rank float checkpoint `convert` writes for `source` (its config and tensors), each tensor computed
    from the source when asked for and nothing written: what calibration runs its float engine from. Memory holds
    the tensors asked for; a written checkpoint would be the whole model, written once and read back once."""

    def __init__(self, source: SourceModel, dtype: str, architecture: str | None = None, check_finite: bool = True):
        prepared = prepare(source, dtype, MappingArgs(), architecture)
        self.config = prepared.config
        self._source = _FiniteChecked(source) if check_finite else source
        self._binding = prepared.binding
        self._ctx = ShardContext.from_config(self.config)
        (rank,) = prepared.plans
        self._plan = {t.name: t for t in rank.tensors}

    def keys(self) -> list[str]:
        return list(self._plan)

    def get_tensor(self, name: str) -> torch.Tensor:
        """What `convert` writes as `name` into rank0.safetensors."""
        t = self._plan[name]
        return _shard_any(_read_float_parts(t, self._binding, self._source, self.config), t.split, 0, self._ctx,
                          name).contiguous()


class _FiniteChecked:
    """A source whose reads refuse NaN and Inf values (model.check_finite), naming the tensor and its file."""

    def __init__(self, inner: SourceModel):
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def read(self, name: str) -> torch.Tensor:
        tensor = self._inner.read(name)
        if tensor.is_floating_point() and not all_finite(tensor):
            values = tensor.float()
            bad, nan = int((~torch.isfinite(values)).sum()), int(torch.isnan(values).sum())
            raise PipelineError(f"tensor {name} in {self._inner.where(name)} holds {nan} NaN and {bad - nan} Inf "
                                "value(s); expected finite weights (set model.check_finite=false to convert them as "
                                "they are)")
        return tensor


# Dtypes with CPU min/max kernels (float8 has neither those nor isfinite: it is checked as float32).
_MINMAX_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, in one streaming pass: min and max both come out finite only when no value
    is NaN (which propagates through both) or +-Inf (which is the max or the min). ~20x faster than counting
    torch.isfinite's mask, which materializes a bool tensor and sums it."""
    if tensor.numel() == 0:
        return True
    if tensor.dtype not in _MINMAX_DTYPES:
        tensor = tensor.float()
    lo, hi = torch.aminmax(tensor)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _quantizer(spec, source, binding, cfg, quantization, stats_dir) -> TargetQuantizer | None:
    q = cfg["quantization"]
    if not (q.get("quant_algo") or q.get("kv_cache_quant_algo")):
        return None
    # A quantized checkpoint source keeps its stored integers and scales: nothing to calibrate.
    need = "none" if getattr(source, "quantized", False) else needs_statistics(quantization,
                                                                               lambda: hasattr(source, "prequantized"))
    if need != "none" and stats_dir is None:
        raise PipelineError(f"quantization {q.get('quant_algo')} / kv {q.get('kv_cache_quant_algo')} needs "
                            "calibration statistics (run the calibrate stage)")
    scheme = get_scheme(q["quant_algo"]) if q.get("quant_algo") else None
    # The written config's values (a kept quantization's group_size) over the recipe's.
    quantization = {**(quantization or {}), **{k: v for k, v in q.items() if v is not None}}
    settings = Settings(dtype=DTYPES[cfg["dtype"]], group_size=int(quantization.get("group_size", 128)),
                        smoothquant_val=float(quantization.get("smoothquant_val", 0.5)),
                        gptq_damp=float(quantization.get("gptq_damp", 0.01)),
                        awq_grid=int(quantization.get("awq_grid", 20)),
                        awq_search=str(quantization.get("awq_search", "coarse_to_fine")),
                        gptq_sm=int(quantization.get("gptq_sm", 80)))

    def read_parts(canons, layer):
        return [_read_canonical(binding[c.at(layer)], source, cfg) for c in canons]

    def read_prequantized(canons, layer):
        bound = [binding[c.at(layer)] for c in canons]
        if any(b.stacked or b.transform for b in bound):
            return None
        found = [source.prequantized(b.names[0]) for b in bound]
        if all(f is None for f in found):
            return None
        if any(f is None for f in found):
            raise PipelineError(f"{[b.names[0] for b in bound]}: fused layers mix GPTQ and float weights")
        return found

    return TargetQuantizer(scheme, settings, StatsReader(stats_dir) if need != "none" else None, read_parts,
                           [t for t in spec.layout if t.present(cfg)], q.get("exclude_modules"),
                           q.get("kv_cache_quant_algo"),
                           read_prequantized if hasattr(source, "prequantized") else None)


def _write_stage(stage, source, binding, cfg, ctx, out_dir, written, bar, quantizer=None) -> int:
    """Stream one pipeline stage: every target read once, each tp rank's piece written to that rank's file."""
    writers = [
        StreamingSafetensorsWriter(out_dir / f"rank{p.rank}.safetensors", [(t.name, t.shape, t.dtype) for t in p.tensors])
        for p in stage
    ]
    nbytes = 0
    try:
        for i, head in enumerate(stage[0].tensors):
            if head.quant is not None:
                settings = quantizer.settings
                if getattr(source, "quantized", False):  # stored integers and scales, taken as they are
                    whole = source.quantized_whole(head, settings, lambda name: _stored_name(binding, name))
                    _check_exact_cast(whole, head.quant.torch_dtype(settings), head.name)
                else:
                    whole = quantizer.whole(head)
                parts = [t.to(head.quant.torch_dtype(settings)) for t in whole]
            else:
                parts = _read_float_parts(head, binding, source, cfg)
            for p, w in zip(stage, writers):
                planned = p.tensors[i]
                piece = _shard_any(parts, planned.split, p.tp_rank, ctx, planned.name)
                if planned.quant is not None and planned.quant.finalize is not None:
                    piece = planned.quant.finalize(piece, quantizer.settings)
                w.write(planned.name, piece)
                written.setdefault(p.rank, []).append(planned.name)
                nbytes += piece.numel() * piece.element_size()
            del parts
            faults.point("convert:tensor")
            bar.update(1)
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return nbytes


def _stored_name(binding: dict[str, Bound], canonical: str) -> str:
    """The source tensor a canonical tensor is read from, for sources that store it quantized."""
    bound = binding[canonical]
    if bound.stacked or bound.transform or bound.joined:
        raise PipelineError(f"{bound.names[0]}: stored quantized, but this architecture transforms it on the way "
                            "(fused, transposed or stacked source tensor); pre-quantized conversion is not supported")
    return bound.names[0]


def _check_exact_cast(tensors: list[torch.Tensor], dtype: torch.dtype, what: str) -> None:
    for t in tensors:
        if t.dtype != dtype and t.dtype.is_floating_point and not torch.equal(t.to(dtype).to(t.dtype), t):
            raise PipelineError(f"{what}: the stored {t.dtype} values would be rounded in {dtype}; convert with the "
                                "dtype the quantized checkpoint was exported in")


def _stored_exclusions(spec: ArchSpec, source: SourceModel, cfg: Mapping[str, Any], mapping: MappingArgs) -> list[str]:
    """exclude_modules (TensorRT-LLM names) for the linear layers a pre-quantized source left in float."""
    from pipeline.quantize.schemes import DEFAULT_EXCLUDES, is_linear

    dims = Dims.from_config(cfg)
    tied = spec.tied_embeddings(source.hf_config)
    available = source.names()
    patterns = list(DEFAULT_EXCLUDES)
    for target in spec.layout:
        module = target.name[: -len(".weight")] if target.name.endswith(".weight") else None
        if module is None or not target.present(cfg) or not is_linear(module):
            continue
        layers = list(range(dims.layers)) if "{layer}" in module else [None]
        flags = {}
        for layer in layers:
            stored = []
            for canon in target.parts:
                canon = Canon.VOCAB_EMBED if (canon is Canon.LM_HEAD and tied) else canon
                names = [a.template.format(layer=layer) for a in _alternatives(spec, canon) if "{expert}" not in a.template]
                name = next((n for n in names if n in available), None)
                stored.append(name is not None and source.is_quantized_weight(name))
            if any(stored) and not all(stored):
                raise PipelineError(f"{module.format(layer=layer)}: the source quantized only some of the layers it "
                                    "fuses; TensorRT-LLM needs all or none")
            flags[layer] = all(stored)
        local = module.replace("transformer.layers.{layer}.", "")
        if module == "lm_head" and flags[None]:
            raise PipelineError("the source stores lm_head quantized; only float lm_head converts")
        if not any(flags.values()):
            if f"*{local}" not in patterns:
                patterns.append(f"*{local}")
        elif not all(flags.values()):
            if mapping.pp_size > 1:
                raise PipelineError(f"the source leaves {local} unquantized in some layers only; with pp_size > 1 "
                                    "TensorRT-LLM's per-stage layer names cannot express that (use pp_size=1)")
            patterns += [module.format(layer=layer) for layer, q in flags.items() if not q]
    return patterns


def _shard_any(parts: list[torch.Tensor], split, rank: int, ctx, name: str) -> torch.Tensor:
    """shard(), also for float8 tensors (split as their bytes: not every op has float8 kernels)."""
    if parts[0].dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        dtype = parts[0].dtype
        return shard([p.view(torch.uint8) for p in parts], split, rank, ctx, name).view(dtype)
    return shard(parts, split, rank, ctx, name)


def _read_float_parts(target, binding: dict[str, Bound], source, cfg) -> list[torch.Tensor]:
    """The canonical parts of an unquantized planned tensor, in fuse order, cast to its dtype."""
    return [_read_canonical(binding[c.at(target.layer)], source, cfg, target.dtype) for c in target.canons]


def _read_canonical(bound: Bound, source, cfg, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One canonical tensor, transformed and cast (when a dtype is given). Experts are read one at a time into one
    preallocated stacked tensor, so memory holds the stacked tensor and one expert, never a list of them."""
    if not bound.stacked:
        tensor = bound.combined([source.read(n) for n in (bound.names[0], *bound.joined)], cfg).contiguous()
        return tensor if dtype is None else tensor.to(dtype)
    stacked = None
    for e, name in enumerate(bound.names):
        tensor = source.read(name)
        if bound.transform:
            tensor = bound.transform(tensor, cfg)
        if stacked is None:
            stacked = torch.empty((len(bound.names), *tensor.shape), dtype=dtype or tensor.dtype)
        stacked[e].copy_(tensor)
        del tensor
    return stacked


def _check_complete(plans: list[RankPlan], written: dict[int, list[str]]) -> None:
    for p in plans:
        want = [t.name for t in p.tensors]
        got = written.get(p.rank, [])
        if got != want:
            lost = sorted(set(want) - set(got)) or sorted(set(got) - set(want))
            raise PipelineError(f"rank {p.rank}: written tensors differ from the plan, e.g. {lost[:1]}")
