"""The `tensorrt` backend: TensorRT engines built with TensorRT's ONNX parser from exactly the onnx backend's files.

Per rank and graph (`step`, `logits`) one plan, `rank{N}.{graph}.plan`, beside the ONNX files it came from:
- strongly typed: the exported dtype (the checkpoint's) is the engine's dtype;
- optimization profiles from the build limits: the step graph gets a context profile (batch 1..max_batch_size,
  sequence 1..max_input_len) and a generation profile (one token per sequence); the caches keep max_seq_len static,
  as TensorRT's KV-cache update layer requires (the parser maps the graph's TensorScatter onto it and SDPA onto
  its fused attention);
- float32 attention has no fused TensorRT kernel, so float32 engines mark attention decomposable;
- `tensorrt.json` records the TensorRT version and flavour, the target compute capability, the profiles, the IO
  tensors and the layer census; the runtime refuses a plan built for another TensorRT or GPU before deserializing.

The cache key holds the TensorRT version and the target compute capability (see `environment`).

Tensor parallelism: one engine per rank and segment. The export cuts each tp rank's graphs at the row-parallel
all-reduce (and vocabulary all-gather) points into segments (pipeline/engine/onnx_segments.py); this backend builds
a plan per segment (`rank{N}.step.seg{K}.plan`, profiles from the segment inputs' recorded dimensions) and the
runtime performs the collectives between engine segments, as the onnx runtime does. Chosen over TensorRT's in-engine
collective (IDistCollectiveLayer) because the same files run and are verified on a CPU through onnxruntime, and it
needs neither TensorRT >= 10.16's preview collectives, an SM80+ GPU, nor NCCL communicator plumbing; it costs
2 x layers + 1 launches per token per rank (docs/BACKENDS.md). Pipeline parallelism: one engine set per stage,
hidden states handed over by the runtime.

Refused by name (see docs/BACKENDS.md): quantized checkpoints (not exported yet; among them, GPTQ with real
zero-points and per-token SmoothQuant have no TensorRT equivalent at all), INT8/FP8 KV caches (TensorRT's KV-cache
update is float32/float16/bfloat16 only).
"""

from __future__ import annotations

import json
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

from pipeline.runtime.trt_model import INSTALL_HINT, MANIFEST, import_tensorrt

MIN_VERSION = (10, 15)


def local_compute_capability() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}.{minor}"
    except Exception:  # a broken CUDA setup reads as no GPU; the build then asks for an explicit target
        pass
    return None


def target_compute_capability(build_config: dict[str, Any]) -> str:
    wanted = build_config.get("tensorrt_compute_capability")
    local = local_compute_capability()
    if wanted and local and str(wanted) != local:
        raise PipelineError(f"build.tensorrt_compute_capability={wanted} but this machine's GPU is compute capability "
                            f"{local}: TensorRT builds for the GPU it runs on; build on a {wanted} GPU")
    if not (wanted or local):
        raise PipelineError("build.backend=tensorrt: no CUDA GPU is visible to build for; TensorRT needs the target GPU "
                            "(set build.tensorrt_compute_capability only to name the GPU you build on)")
    return str(wanted or local)


def graph_shapes(entry: dict[str, Any], graph: str, limits: dict[str, Any]) -> list[dict[str, tuple]]:
    """Per optimization profile, (min, opt, max) shapes of every input of `graph` for this rank."""
    from pipeline.engine.onnx_export import profiles
    from pipeline.runtime.model import ModelArgs

    a = ModelArgs(**entry["model"])
    max_seq = limits["max_seq_len"]
    phases = profiles(limits)
    if graph == "logits":  # context logits see every prompt position, generation one: one profile spans both
        phases = {"all": phases["context"]}
    result = []
    for dims in phases.values():
        shapes: dict[str, tuple] = {}
        for i in range(3):  # min, opt, max
            b, t = dims["batch"][i], dims["seq"][i]
            one = {}
            if graph == "logits":
                one["hidden"] = (b, t, a.hidden_size)
            else:
                one["x"] = (b, t) if _first_stage(entry) else (b, t, a.hidden_size)
                one["positions"] = (b, t)
                for name in entry["inputs"][2:]:
                    one[name] = (b, a.local_kv_heads, max_seq, a.head_size)
            for name, shape in one.items():
                shapes.setdefault(name, []).append(shape)
        result.append({k: tuple(v) for k, v in shapes.items()})
    return result


def segment_shapes(inputs: list[dict[str, Any]], graph: str, limits: dict[str, Any]) -> list[dict[str, tuple]]:
    """Per optimization profile, (min, opt, max) shapes of a tp segment's inputs (see onnx_segments): their
    dimensions as the export recorded them, `batch` and `seq` (or expressions of them) from the limits' phases."""
    from pipeline.engine.onnx_export import profiles

    phases = profiles(limits)
    if graph == "logits":
        phases = {"all": phases["context"]}
    result = []
    for dims in phases.values():
        shapes = {}
        for spec in inputs:
            if all(isinstance(n, int) for n in spec["shape"]):
                continue  # static: nothing for a profile to say
            shapes[spec["name"]] = tuple(tuple(_dim(n, dims["batch"][i], dims["seq"][i], spec["name"])
                                               for n in spec["shape"]) for i in range(3))
        result.append(shapes)
    return result


def _dim(value: int | str, batch: int, seq: int, name: str) -> int:
    """A recorded dimension: a number, or an arithmetic expression of the symbolic `batch` and `seq`."""
    import ast

    if isinstance(value, int):
        return value
    allowed = (ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Constant, ast.Name, ast.Load)
    tree = ast.parse(value, mode="eval")
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    if not all(isinstance(n, allowed) for n in ast.walk(tree)) or not names <= {"batch", "seq"}:
        raise PipelineError(f"segment input {name} has a dimension {value!r} the profiles cannot bound")
    return int(eval(compile(tree, name, "eval"), {"__builtins__": {}}, {"batch": batch, "seq": seq}))


def _first_stage(entry: dict[str, Any]) -> bool:
    return entry["model"]["layers"][0] == 0 if entry["model"]["layers"] else True


def build_plan(trt, onnx_path: Path, profiles: list[dict[str, tuple]], dtype: str,
               compute_capability: str | None = None, flavour: str = "tensorrt") -> tuple[bytes, dict[str, Any]]:
    """Parse `onnx_path` with TensorRT's ONNX parser into a strongly typed network, add `profiles`, build; returns
    the plan and what was built (layer census, IO tensors, whether attention was decomposed)."""
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        raise PipelineError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors[0] if errors else 'unknown'}")
    census = Counter(str(network.get_layer(i).type).split(".")[-1] for i in range(network.num_layers))
    decomposed = dtype == "float32"  # no fused float32 attention kernel exists
    if decomposed:
        _mark_attention_decomposable(trt, network)
    config = builder.create_builder_config()
    if flavour == "tensorrt-rtx" and compute_capability:
        sm = getattr(trt.ComputeCapability, "SM" + compute_capability.replace(".", ""), None)
        if sm is None:
            raise PipelineError(f"TensorRT-RTX cannot target compute capability {compute_capability}")
        config.num_compute_capabilities = 1
        config.set_compute_capability(sm, 0)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None and not decomposed:  # no fused kernel for these shapes: let TensorRT decompose attention
        decomposed = True
        _mark_attention_decomposable(trt, network)
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise PipelineError(f"TensorRT could not build {onnx_path.name} (its log above says why)")
    io = [{"name": network.get_input(i).name, "mode": "input", "dtype": str(network.get_input(i).dtype).split(".")[-1],
           "shape": list(network.get_input(i).shape)} for i in range(network.num_inputs)]
    io += [{"name": network.get_output(i).name, "mode": "output",
            "dtype": str(network.get_output(i).dtype).split(".")[-1], "shape": list(network.get_output(i).shape)}
           for i in range(network.num_outputs)]
    return bytes(plan), {"layer_census": dict(sorted(census.items())), "io": io, "attention_decomposed": decomposed}


def _mark_attention_decomposable(trt, network) -> None:
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.ATTENTION_INPUT:
            layer.__class__ = trt.IAttentionInputLayer
            layer.attention.decomposable = True


def build_plans(engine_dir: Path, trt, flavour: str, compute_capability: str | None) -> dict[str, Any]:
    """A plan for every ONNX graph of an exported engine directory; writes tensorrt.json; returns it."""
    from pipeline.engine.onnx_backend import GRAPHS_FILE

    config = json.loads((engine_dir / "config.json").read_text())
    graphs = json.loads((engine_dir / GRAPHS_FILE).read_text())
    limits, dtype = config["build_config"], config["pretrained_config"]["dtype"]
    built = []
    for entry in graphs["ranks"]:
        todo = [(graph, None, onnx_file, graph_shapes(entry, graph, limits))
                for graph, onnx_file in entry["files"].items()]
        todo += [(graph, k, item["segment"], segment_shapes(item["inputs"], graph, limits))
                 for graph, plan in (entry.get("segments") or {}).items()
                 for k, item in enumerate(plan) if "segment" in item]
        for graph, position, onnx_file, shapes in todo:
            started = time.perf_counter()
            plan, info = build_plan(trt, engine_dir / onnx_file, shapes, dtype, compute_capability, flavour)
            name = onnx_file.replace(".onnx", ".plan")
            (engine_dir / name).write_bytes(plan)
            built.append({"rank": entry["rank"], "graph": graph, "position": position, "onnx": onnx_file, "plan": name,
                          "plan_bytes": len(plan), "seconds": round(time.perf_counter() - started, 3),
                          "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in shapes], **info})
    manifest = {"tensorrt": trt.__version__, "flavour": flavour, "compute_capability": compute_capability,
                "platform": f"{platform.system()}-{platform.machine()}", "plans": built}
    (engine_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


class TensorrtBackend:
    name = "tensorrt"

    def environment(self, build_config: dict[str, Any]) -> dict[str, Any]:
        from pipeline.engine.onnx_backend import BACKEND as ONNX

        trt, flavour = import_tensorrt()
        return {"tensorrt": trt.__version__, "flavour": flavour, "compute_capability": target_compute_capability(
            build_config), "platform": f"{platform.system()}-{platform.machine()}", **ONNX.environment(build_config)}

    def build(self, checkpoint_dir: Path, engine_dir: Path, build_config: dict[str, Any]) -> dict[str, Any]:
        from pipeline.engine.onnx_backend import export_engine

        trt, flavour = import_tensorrt()
        version = tuple(int(p) for p in trt.__version__.split(".")[:2])
        if version < MIN_VERSION:
            raise PipelineError(f"TensorRT {trt.__version__} is installed; the tensorrt backend needs >= "
                                f"{'.'.join(map(str, MIN_VERSION))}. {INSTALL_HINT}")
        cc = target_compute_capability(build_config)
        metrics = export_engine(Path(checkpoint_dir), Path(engine_dir), build_config, self.name)
        started = time.perf_counter()
        manifest = build_plans(Path(engine_dir), trt, flavour, cc)
        census = Counter()
        for p in manifest["plans"]:
            census.update(p["layer_census"])
        return {**metrics, "engine_bytes": sum(p["plan_bytes"] for p in manifest["plans"]),
                "build_seconds": round(metrics["export_seconds"] + time.perf_counter() - started, 3),
                "tensorrt_version": trt.__version__, "compute_capability": cc,
                "tensorrt_layer_census": dict(sorted(census.items()))}


BACKEND = TensorrtBackend()
