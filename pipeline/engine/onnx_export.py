"""ONNX export of the runtime's own modules, one rank at a time.

The cpu runtime's `EngineModel` is exported through thin wrappers, never re-implemented: per rank a *step* graph
(tokens on the first pipeline stage, hidden states elsewhere; explicit positions; one past key and value cache input
and one present output per layer -> hidden states and the present caches) and, on the last stage, a *logits* graph
(final norm, head, soft-cap). Batch and sequence are dynamic dimensions; the caches keep `max_seq_len` static, as
TensorRT's KV-cache update requires. A cache write is ONNX `TensorScatter` (opset 24) at each sequence's first
position, attention is SDPA (exported as ONNX `Attention`), so TensorRT's parser maps them onto its native KV-cache
and attention layers. Attention runs over the whole static cache with the causal (or sliding-window) mask built
from the positions, so there is no data-dependent control flow.

Under tensor parallelism the runtime's collectives (all-reduce after the row-parallel projections, all-gather of
vocabulary-parallel logits) are traced as marker nodes (`CollectiveMarkers`), at which onnx_segments then cuts each
graph into segments the runtime runs with the collectives between them.

What the export does not cover is refused by name before anything is exported (`unsupported_features`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.checkpoint.safetensors_stream import iter_tensors, read_header
from pipeline.engine.onnx_segments import COLLECTIVE_DOMAIN, split_at_collectives
from pipeline.errors import PipelineError
from pipeline.runtime.kernels import TorchKernel
from pipeline.runtime.model import DTYPES, EngineModel, ModelArgs
from pipeline.runtime.parallel import Dist

OPSET = 24
# Ops that would mean data-dependent control flow or shapes: TensorRT cannot build Attention inside them and they
# defeat static KV-cache planning. The census fails the export when one appears.
FORBIDDEN_OPS = {"If", "Loop", "Scan", "NonZero", "Unique", "Compress"}
EXTERNAL_DATA_BYTES = 1 << 30  # models above this keep their weights beside the graph (protobuf's 2 GB limit)




def unsupported_features(args: ModelArgs) -> list[str]:
    """Features of this engine the ONNX export does not express (yet), each named for the error message."""
    problems = []
    if args.act_quant:
        problems.append(f"activation quantization ({args.act_quant})")
    if args.kv_cache_quant:
        problems.append(f"a quantized KV cache ({args.kv_cache_quant})")
    return problems


class CollectiveMarkers:
    """Dist.collectives while exporting a tp rank: each TP collective of the runtime becomes one marker node
    (`trtllm_pipeline::AllReduce`, `trtllm_pipeline::AllGather` with its axis) of the traced graph, where the
    runtime's torch.distributed call would be. onnx_segments cuts the graph at these nodes."""

    def __init__(self, tp_size: int):
        self.tp_size = tp_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return torch.onnx.ops.symbolic(f"{COLLECTIVE_DOMAIN}::AllReduce", (x,), {"tp_size": self.tp_size},
                                       dtype=x.dtype, shape=x.shape, version=1)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        axis = dim % x.dim()
        shape = [n * self.tp_size if i == axis else n for i, n in enumerate(x.shape)]
        return torch.onnx.ops.symbolic(f"{COLLECTIVE_DOMAIN}::AllGather", (x,), {"axis": axis, "tp_size": self.tp_size},
                                       dtype=x.dtype, shape=shape, version=1)


class _ExportCache:
    """Stands in for a layer's KVCache while exporting: the past cache is a graph input and the update is a
    functional ONNX TensorScatter at each sequence's write index (its first position), giving the present cache."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def update(self, input_pos, k, v, kv_len, scale=None):
        write = input_pos[:, 0]
        self.k, self.v = _tensor_scatter(self.k, k, write), _tensor_scatter(self.v, v, write)
        return self.k, self.v


def _tensor_scatter(cache: torch.Tensor, update: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
    """cache [B, H, S_max, D] with update [B, H, T, D] written at positions write[b] .. write[b] + T - 1."""
    return torch.onnx.ops.symbolic("::TensorScatter", (cache, update.to(cache.dtype), write),
                                   {"axis": 2, "mode": "linear"}, dtype=cache.dtype, shape=cache.shape, version=OPSET)


class StepGraph(nn.Module):
    """EngineModel.step with explicit caches: (x, positions, past_k_0, past_v_0, ...) -> (hidden, present_k_0, ...)."""

    def __init__(self, model: EngineModel, max_seq: int):
        super().__init__()
        self.model, self.max_seq = model, max_seq

    def forward(self, x: torch.Tensor, positions: torch.Tensor, *past: torch.Tensor):
        caches = [_ExportCache(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        saved, self.model.caches = self.model.caches, caches
        try:
            h = self.model.step(x, positions, self.max_seq)
        finally:
            self.model.caches = saved
        return (h, *(t for c in caches for t in (c.k, c.v)))


class LogitsGraph(nn.Module):
    """EngineModel.logits: hidden [B, T, H] -> float32 logits [B, T, vocab]."""

    def __init__(self, model: EngineModel):
        super().__init__()
        self.model = model

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.logits(h)


def load_cpu_engine_rank(path: Path) -> tuple[EngineModel, dict[str, Any]]:
    """The runtime model of one cpu-engine rank file, with plain torch linears (what the export traces)."""
    meta = json.loads(read_header(path)[0]["__metadata__"]["engine"])
    args, limits, mapping = ModelArgs(**meta["model"]), meta["limits"], meta["mapping"]
    d = Dist(meta["rank"], mapping["tp_size"], mapping["pp_size"])
    if d.tp_size > 1:
        d.collectives = CollectiveMarkers(d.tp_size)
    model = EngineModel(args, d, 1, limits["max_seq_len"], TorchKernel())
    missing = model.load_weights(iter_tensors(path))
    if missing:
        raise PipelineError(f"{path} lacks tensors the runtime model needs, e.g. {missing[:3]}")
    model.set_moe_formulation(sparse=False)  # every expert on every token: no data-dependent shapes to trace
    return model.eval(), meta


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names of a step graph with `num_layers` local layers."""
    past = [f"past_{kv}_{j}" for j in range(num_layers) for kv in ("key", "value")]
    present = [f"present_{kv}_{j}" for j in range(num_layers) for kv in ("key", "value")]
    return ["x", "positions", *past], ["hidden", *present]


def profiles(limits: dict[str, Any]) -> dict[str, dict[str, tuple[int, int, int]]]:
    """Optimization profiles (min, opt, max) of the dynamic dimensions, from the build limits: the context phase
    (prefill: batch up to max_batch_size, sequences up to max_input_len; tuned for a full max_num_tokens pass) and
    the generation phase (one token per sequence). A prompt longer than max_num_tokens is prefilled alone, so the
    sequence range stays max_input_len."""
    b, t = limits["max_batch_size"], limits["max_input_len"]
    opt_t = max(1, min(t, limits["max_num_tokens"] // b))
    return {"context": {"batch": (1, b, b), "seq": (1, opt_t, t)},
            "generation": {"batch": (1, b, b), "seq": (1, 1, 1)}}


def export_rank(model: EngineModel, limits: dict[str, Any], out_dir: Path, rank: int) -> dict[str, Any]:
    """Write rank{rank}.step.onnx (and rank{rank}.logits.onnx on the last stage); check them; return a manifest
    with the files, IO names and the op census."""
    a, d = model.args, model.d
    dtype = DTYPES[a.dtype]
    max_seq = limits["max_seq_len"]
    b, t = 2, 3  # examples above 1, so the exporter keeps batch and sequence symbolic
    x = torch.zeros(b, t, dtype=torch.int64) if d.is_first_stage else torch.zeros(b, t, a.hidden_size, dtype=dtype)
    positions = torch.arange(t).expand(b, t).contiguous()
    cache_shape = (b, a.local_kv_heads, max_seq, a.head_size)
    past = [torch.zeros(cache_shape, dtype=dtype) for _ in range(2 * len(a.layers))]
    inputs, outputs = io_names(len(a.layers))
    batch = torch.export.Dim("batch", min=1, max=max(2, limits["max_batch_size"]))
    seq = torch.export.Dim("seq", min=1, max=max(3, limits["max_input_len"]))
    dynamic = {"x": {0: batch, 1: seq}, "positions": {0: batch, 1: seq}, "past": tuple({0: batch} for _ in past)}
    files = {"step": f"rank{rank}.step.onnx"}
    census = Counter()
    with torch.inference_mode(False), torch.no_grad():
        _export(StepGraph(model, max_seq).eval(), (x, positions, *past), out_dir / files["step"], inputs, outputs,
                {"x": dynamic["x"], "positions": dynamic["positions"], "past": dynamic["past"]}, census)
        if d.is_last_stage:
            files["logits"] = f"rank{rank}.logits.onnx"
            h = torch.zeros(b, t, a.hidden_size, dtype=dtype)
            _export(LogitsGraph(model).eval(), (h,), out_dir / files["logits"], ["hidden"], ["logits"],
                    {"h": {0: batch, 1: seq}}, census)
    manifest = {"rank": rank, "files": files, "inputs": inputs, "outputs": outputs,
                "op_census": dict(sorted(census.items())), "model": asdict(a)}
    if d.tp_size > 1:  # each graph cut at its collectives; the runtime performs them between the segments
        manifest["segments"] = {graph: split_at_collectives(out_dir / file) for graph, file in files.items()}
        manifest["files"] = {}
    return manifest


def _export(module: nn.Module, example: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: dict,
            census: Counter) -> None:
    import onnx

    program = torch.onnx.export(module, example, dynamo=True, opset_version=OPSET, input_names=inputs,
                                output_names=outputs, dynamic_shapes=dynamic, optimize=True, verbose=False)
    ir = program.model
    ops = Counter(node.op_type for node in ir.graph)
    for function in ir.functions.values():
        ops.update(node.op_type for node in function)
    bad = sorted(set(ops) & FORBIDDEN_OPS)
    if bad:
        raise PipelineError(f"the ONNX export of {path.name} contains data-dependent ops {bad}")
    weight_bytes = sum(v.const_value.nbytes for v in ir.graph.initializers.values() if v.const_value is not None)
    program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    onnx.checker.check_model(str(path), full_check=True)
    census.update(ops)
