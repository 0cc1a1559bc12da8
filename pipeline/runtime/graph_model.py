"""Stage models for exported engines: the same `step` / `logits` / `caches` contract as `EngineModel`, executed by
onnxruntime (`onnx` engines) or TensorRT (`tensorrt` engines, see trt_model), so `ModelRunner` drives them unchanged
(batching, prefill chunks, decode loop, sampling, PP hand-over of hidden states over MPI).

The KV caches are allocated once, [max_batch, kv_heads, max_seq, head_size] per layer, as torch tensors; a step
binds a batch's rows of them as the graph's past caches and the same memory as its present caches (the graph's
TensorScatter writes in place), so nothing is copied per step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.runtime.kv_cache import lazy_zeros
from pipeline.runtime.model import DTYPES, ModelArgs
from pipeline.runtime.parallel import Dist

GRAPHS_FILE = "graphs.json"


class GraphCache:
    """One layer's key and value buffers; `k`/`v` may be re-pointed to row views (prefill chunks)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v


def read_graphs(engine_dir: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """graphs.json and this rank's entry."""
    path = engine_dir / GRAPHS_FILE
    if not path.is_file():
        raise PipelineError(f"{engine_dir} is not an exported engine: {GRAPHS_FILE} is missing")
    graphs = json.loads(path.read_text())
    entries = {r["rank"]: r for r in graphs["ranks"]}
    if rank not in entries:
        raise PipelineError(f"{path} has no rank {rank}")
    return graphs, entries[rank]


def allocate_caches(args: ModelArgs, max_batch: int, max_seq: int, device: str = "cpu") -> list[GraphCache]:
    shape = (max_batch, args.local_kv_heads, max_seq, args.head_size)
    dtype = DTYPES[args.dtype]
    if device == "cpu":
        return [GraphCache(lazy_zeros(shape, dtype), lazy_zeros(shape, dtype)) for _ in args.layers]
    return [GraphCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in args.layers]


_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_}


class OnnxStageModel:
    """One rank of an `onnx` engine run by onnxruntime (CPU, or CUDA when onnxruntime-gpu is installed)."""

    def __init__(self, engine_dir: Path, d: Dist, config: dict[str, Any], providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise PipelineError("running an onnx engine needs onnxruntime: pip install 'trtllm-pipeline[onnx]'") from None
        graphs, entry = read_graphs(engine_dir, d.rank)
        self.args, self.d = ModelArgs(**entry["model"]), d
        self.inputs, self.outputs = entry["inputs"], entry["outputs"]
        limits = config["build_config"]
        self.max_seq = limits["max_seq_len"]
        self.caches = allocate_caches(self.args, limits["max_batch_size"], self.max_seq)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings such as TensorScatter's copy notice stay off the console
        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.dtype = DTYPES[self.args.dtype]
        segments = entry.get("segments") or {}
        self.step_segments = (OnnxSegments(ort, engine_dir, segments["step"], options, providers, d)
                              if "step" in segments else None)
        self.logits_segments = (OnnxSegments(ort, engine_dir, segments["logits"], options, providers, d)
                                if "logits" in segments else None)
        self.step_session = (None if self.step_segments else
                             ort.InferenceSession(str(engine_dir / entry["files"]["step"]), options, providers=providers))
        self.logits_session = (ort.InferenceSession(str(engine_dir / entry["files"]["logits"]), options,
                                                    providers=providers) if "logits" in entry["files"] else None)

    def eval(self) -> "OnnxStageModel":
        return self

    def step(self, x: torch.Tensor, input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Same contract as EngineModel.step; the graph attends over the whole cache under the causal mask, so
        `kv_len` needs no input of its own."""
        b, t = input_pos.shape
        x = x.contiguous() if self.d.is_first_stage else x.to(self.dtype).contiguous()
        positions = input_pos.to(torch.int64).contiguous()
        if self.step_segments is not None:  # tensor parallel: segments with the all-reduces between them
            env = {"x": x, "positions": positions}
            present = {}
            for j, c in enumerate(self.caches):
                env[f"past_key_{j}"] = present[f"present_key_{j}"] = c.k[:b]
                env[f"past_value_{j}"] = present[f"present_value_{j}"] = c.v[:b]
            return self.step_segments.run(env, present)["hidden"]
        hidden = torch.empty(b, t, self.args.hidden_size, dtype=self.dtype)
        binding = self.step_session.io_binding()
        _bind(binding.bind_input, "x", x)
        _bind(binding.bind_input, "positions", positions)
        _bind(binding.bind_output, "hidden", hidden)
        for j, c in enumerate(self.caches):
            for kind, buf in (("key", c.k[:b]), ("value", c.v[:b])):
                _bind(binding.bind_input, f"past_{kind}_{j}", buf)
                _bind(binding.bind_output, f"present_{kind}_{j}", buf)
        self.step_session.run_with_iobinding(binding)
        return hidden

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.logits_segments is not None:
            return self.logits_segments.run({"hidden": h.to(self.dtype).contiguous()}, {})["logits"]
        if self.logits_session is None:
            raise PipelineError(f"rank {self.d.rank} is not the last pipeline stage and has no logits graph")
        out = self.logits_session.run(None, {"hidden": h.to(self.dtype).contiguous().numpy()})[0]
        return torch.from_numpy(out)


class OnnxSegments:
    """A tp rank's graph cut at its collectives (see pipeline/engine/onnx_segments.py): onnxruntime runs each
    segment, torch.distributed performs each collective over the tp group, as the cpu runtime does."""

    def __init__(self, ort, engine_dir: Path, plan: list[dict[str, Any]], options, providers: list[str], d: Dist):
        self.d, self.plan = d, plan
        self.sessions = [ort.InferenceSession(str(engine_dir / item["segment"]), options, providers=providers)
                         if "segment" in item else None for item in plan]

    def run(self, env: dict[str, torch.Tensor], bound: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run every segment and collective in order; `env` holds the graph inputs and receives every tensor a
        segment or collective makes; outputs named in `bound` are written into those buffers (the KV caches)."""
        for item, session in zip(self.plan, self.sessions):
            if session is None:
                env[item["output"]] = _collective(item, env[item["input"]], self.d)
                continue
            binding = session.io_binding()
            for spec in item["inputs"]:
                _bind(binding.bind_input, spec["name"], env[spec["name"]].contiguous())
            for spec in item["outputs"]:
                if spec["name"] in bound:
                    _bind(binding.bind_output, spec["name"], bound[spec["name"]])
                else:
                    binding.bind_output(spec["name"], "cpu")
            session.run_with_iobinding(binding)
            for spec, value in zip(item["outputs"], binding.get_outputs()):
                env[spec["name"]] = bound.get(spec["name"])
                if env[spec["name"]] is None:
                    env[spec["name"]] = torch.from_numpy(value.numpy())
        return env


def _collective(item: dict[str, Any], x: torch.Tensor, d: Dist) -> torch.Tensor:
    from pipeline.runtime.parallel import tp_all_gather, tp_all_reduce

    if item["collective"] == "all_reduce":
        return tp_all_reduce(x.clone(), d)
    return tp_all_gather(x, d, item["axis"])


def _bind(bind, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise PipelineError(f"internal: buffer {name} is not contiguous")
    bind(name, "cpu", 0, _NP[t.dtype], list(t.shape), t.data_ptr())
