"""One rank of a `tensorrt` engine on a CUDA GPU, with EngineModel's `step` / `logits` / `caches` contract.

torch CUDA tensors are the I/O buffers; the KV caches are allocated once and bound as both the past input and the
present output of each layer (TensorRT's KV-cache update writes in place: the engine aliases them). The step engine
has one execution context per optimization profile (context: prefill; generation: one token per sequence), so no
profile switch happens between steps. Hidden states leave a stage on the CPU for the MPI hand-over between pipeline
stages; logits come back as float32 on the CPU, as the cpu runtime returns them. Tensor-parallel engines are engine
segments with the collectives between them (TrtSegments; see pipeline/engine/onnx_segments.py for why).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.runtime.graph_model import allocate_caches, read_graphs
from pipeline.runtime.model import DTYPES, ModelArgs
from pipeline.runtime.parallel import Dist

CONTEXT, GENERATION = 0, 1
MANIFEST = "tensorrt.json"
INSTALL_HINT = ("build.backend=tensorrt needs TensorRT >= 10.15 (its ONNX parser maps TensorScatter and Attention onto "
                "native layers) on a machine with an NVIDIA GPU: pip install tensorrt-cu12 "
                "--extra-index-url https://pypi.nvidia.com")


def import_tensorrt(allow_rtx: bool = False):
    """(module, flavour): datacenter TensorRT; with `allow_rtx`, TensorRT-RTX as a fallback (it builds on a machine
    without a GPU, which makes it the CPU-side structural check; its plans run on RTX GPUs only)."""
    try:
        import tensorrt as trt

        return trt, "tensorrt"
    except ImportError:
        if not allow_rtx:
            raise PipelineError(f"TensorRT is not installed. {INSTALL_HINT}") from None
    try:
        import tensorrt_rtx as trt

        return trt, "tensorrt-rtx"
    except ImportError:
        raise PipelineError(f"neither TensorRT nor TensorRT-RTX is installed. {INSTALL_HINT}; for CPU-only "
                            "structural builds: pip install 'trtllm-pipeline[tensorrt-rtx]'") from None



class TrtStageModel:
    def __init__(self, engine_dir: Path, d: Dist, config: dict[str, Any]):
        trt, flavour = import_tensorrt()
        if not torch.cuda.is_available():
            raise PipelineError(f"{engine_dir} is a TensorRT engine: it runs on a CUDA GPU and none is visible")
        manifest = json.loads((engine_dir / MANIFEST).read_text())
        _check_compatible(manifest, trt.__version__, flavour, engine_dir)
        graphs, entry = read_graphs(engine_dir, d.rank)
        self.args, self.d = ModelArgs(**entry["model"]), d
        self.inputs = entry["inputs"]
        self.dtype = DTYPES[self.args.dtype]
        torch.cuda.set_device(d.rank % torch.cuda.device_count())
        self.device = torch.device("cuda", torch.cuda.current_device())
        limits = config["build_config"]
        self.caches = allocate_caches(self.args, limits["max_batch_size"], limits["max_seq_len"], "cuda")
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        mine = [p for p in manifest["plans"] if p["rank"] == d.rank]
        plans = {p["graph"]: p["plan"] for p in mine if p.get("position") is None}
        segment_plans = {(p["graph"], p["position"]): p["plan"] for p in mine if p.get("position") is not None}
        segments = entry.get("segments") or {}
        self.step_segments, self.logits_segments = (
            TrtSegments(self, engine_dir, segments[g], {k: f for (graph, k), f in segment_plans.items() if graph == g})
            if g in segments else None for g in ("step", "logits"))
        self.step_engine = self._load(engine_dir / plans["step"]) if "step" in plans else None
        self.step_contexts = ([self._context(self.step_engine, i)
                               for i in range(self.step_engine.num_optimization_profiles)] if self.step_engine else [])
        self.logits_engine = self._load(engine_dir / plans["logits"]) if "logits" in plans else None
        self.logits_context = self._context(self.logits_engine, 0) if self.logits_engine else None

    def _load(self, path: Path):
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise PipelineError(f"TensorRT could not deserialize {path} (built for another TensorRT or GPU?)")
        return engine

    def _context(self, engine, profile: int):
        context = engine.create_execution_context()
        context.set_optimization_profile_async(profile, torch.cuda.current_stream().cuda_stream)
        return context

    def eval(self) -> "TrtStageModel":
        return self

    def step(self, x: torch.Tensor, input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        b, t = input_pos.shape
        x = x.to(self.device) if self.d.is_first_stage else x.to(self.device, self.dtype)
        buffers = {"x": x.contiguous(), "positions": input_pos.to(self.device, torch.int64).contiguous()}
        if self.step_segments is not None:  # tensor parallel: engine segments, the collectives between them
            present = {}
            for j, c in enumerate(self.caches):
                buffers[f"past_key_{j}"] = present[f"present_key_{j}"] = c.k[:b]
                buffers[f"past_value_{j}"] = present[f"present_value_{j}"] = c.v[:b]
            hidden = self.step_segments.run(buffers, present, decode=t == 1)["hidden"]
            return hidden if self.d.is_last_stage else hidden.cpu()
        context = self.step_contexts[GENERATION if t == 1 and len(self.step_contexts) > 1 else CONTEXT]
        hidden = torch.empty(b, t, self.args.hidden_size, dtype=self.dtype, device=self.device)
        outputs = {"hidden": hidden}
        for j, c in enumerate(self.caches):
            for kind, buf in (("key", c.k[:b]), ("value", c.v[:b])):
                buffers[f"past_{kind}_{j}"] = buf
                outputs[f"present_{kind}_{j}"] = buf  # the same memory: the update is in place
        _execute(context, buffers, outputs)
        return hidden if self.d.is_last_stage else hidden.cpu()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.logits_segments is not None:
            h = h.to(self.device, self.dtype).contiguous()
            return self.logits_segments.run({"hidden": h}, {}, decode=False)["logits"].float().cpu()
        if self.logits_context is None:
            raise PipelineError(f"rank {self.d.rank} is not the last pipeline stage and has no logits engine")
        h = h.to(self.device, self.dtype).contiguous()
        out = torch.empty(*h.shape[:-1], self.args.vocab_size, dtype=torch.float32, device=self.device)
        _execute(self.logits_context, {"hidden": h}, {"logits": out})
        return out.cpu()


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


class TrtSegments:
    """A tp rank's graph as engine segments (one plan per segment of pipeline/engine/onnx_segments.py, one
    execution context per profile); the collectives between them go over the runtime's tp group (torch.distributed
    gloo, through host memory, as the cpu runtime does)."""

    def __init__(self, stage: "TrtStageModel", engine_dir: Path, plan: list[dict[str, Any]], files: dict[int, str]):
        self.stage, self.plan, self.parts = stage, plan, []
        for k, item in enumerate(plan):
            if "segment" not in item:
                self.parts.append(None)
                continue
            engine = stage._load(engine_dir / files[k])
            self.parts.append([stage._context(engine, i) for i in range(engine.num_optimization_profiles)])

    def run(self, env: dict[str, torch.Tensor], bound: dict[str, torch.Tensor], decode: bool) -> dict:
        from pipeline.runtime.parallel import tp_all_gather, tp_all_reduce

        device = self.stage.device
        for item, contexts in zip(self.plan, self.parts):
            if contexts is None:
                x = env[item["input"]].cpu()
                y = (tp_all_reduce(x, self.stage.d) if item["collective"] == "all_reduce"
                     else tp_all_gather(x, self.stage.d, item["axis"]))
                env[item["output"]] = y.to(device)
                continue
            context = contexts[GENERATION if decode and len(contexts) > 1 else CONTEXT]
            inputs = {spec["name"]: env[spec["name"]].contiguous() for spec in item["inputs"]}
            for name, t in inputs.items():
                context.set_input_shape(name, tuple(t.shape))
            outputs = {}
            for spec in item["outputs"]:
                t = bound.get(spec["name"])
                if t is None:
                    shape = tuple(context.get_tensor_shape(spec["name"]))
                    t = torch.empty(shape, dtype=_TORCH_DTYPES[spec["dtype"]], device=device)
                outputs[spec["name"]] = env[spec["name"]] = t
            _execute(context, inputs, outputs)
        return env


def _execute(context, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
    for name, t in inputs.items():
        context.set_input_shape(name, tuple(t.shape))
        context.set_tensor_address(name, t.data_ptr())
    for name, t in outputs.items():
        context.set_tensor_address(name, t.data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise PipelineError("TensorRT failed to execute a step (its log above says why)")
    stream.synchronize()


def _check_compatible(manifest: dict[str, Any], version: str, flavour: str, engine_dir: Path) -> None:
    """A plan runs only on the TensorRT and GPU generation it was built for; say so before deserializing."""
    problems = []
    if manifest["tensorrt"] != version or manifest["flavour"] != flavour:
        problems.append(f"built with {manifest['flavour']} {manifest['tensorrt']}, this machine has {flavour} {version}")
    major, minor = torch.cuda.get_device_capability()
    if manifest["compute_capability"] != f"{major}.{minor}":
        problems.append(f"built for compute capability {manifest['compute_capability']}, this GPU is {major}.{minor}")
    if manifest["platform"] != f"{platform.system()}-{platform.machine()}":
        problems.append(f"built on {manifest['platform']}")
    if problems:
        raise PipelineError(f"{engine_dir}: " + "; ".join(problems) + "; rebuild the engine on this machine")
