"""The `onnx` backend: the runtime's own modules exported to ONNX per rank (see onnx_export), run by onnxruntime.

The engine directory holds the engine `config.json` (backend `onnx`), per rank `rank{N}.step.onnx` (and
`rank{N}.logits.onnx` on the last pipeline stage), `graphs.json` (the model description per rank, graph IO names,
optimization profiles from the limits, op census, exporter versions) and the checkpoint's tokenizer. The graphs are
exported from a cpu engine built on the way, so the weight mapping is the cpu backend's, unchanged. The `tensorrt`
backend builds from exactly these files.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

GRAPHS_FILE = "graphs.json"
FORMAT_VERSION = 1
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INSTALL_HINT = "pip install 'trtllm-pipeline[onnx]' (onnx, onnxscript, onnxruntime)"


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of `names`; an error naming what to install when one is missing."""
    versions, missing = {}, []
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise PipelineError(f"the onnx export needs {', '.join(missing)}, which is not installed: {INSTALL_HINT}")
    return versions


def checkpoint_refusals(ckpt: dict[str, Any], backend: str = "onnx") -> list[str]:
    """What the ONNX export does not cover in this checkpoint, by name (checked before any work)."""
    q = ckpt.get("quantization") or {}
    problems = []
    if q.get("quant_algo"):
        problems.append(f"quant_algo={q['quant_algo']} (quantized checkpoints are not exported yet; "
                        "build the float checkpoint or use build.backend=cpu)")
    if q.get("kv_cache_quant_algo"):
        problems.append(f"kv_cache_quant_algo={q['kv_cache_quant_algo']} (a quantized KV cache; TensorRT's KV-cache "
                        "update layer stores float32/float16/bfloat16 only)")
    if ckpt.get("dtype") == "bfloat16" and backend == "onnx":
        problems.append("dtype=bfloat16 (onnxruntime's Python buffers have no bfloat16; use float32 or float16, "
                        "or build.backend=tensorrt)")
    return problems


def export_engine(checkpoint_dir: Path, engine_dir: Path, build_config: dict[str, Any], backend: str) -> dict[str, Any]:
    """Build the onnx engine directory (also the first half of the tensorrt backend, with `backend` in its config)."""
    from pipeline.engine.cpu import BACKEND as CPU
    from pipeline.engine.onnx_export import export_rank, load_cpu_engine_rank, profiles, unsupported_features

    versions = {"torch": md.version("torch"), **package_versions(ONNX_PACKAGES)}
    ckpt = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    refused = checkpoint_refusals(ckpt, backend)
    if refused:
        raise PipelineError(f"build.backend={backend} cannot export this checkpoint: " + "; ".join(refused))
    started = time.perf_counter()
    engine_dir.mkdir(parents=True, exist_ok=True)
    staging = engine_dir / ".cpu_engine"
    try:
        CPU.build(checkpoint_dir, staging, {**build_config, "backend": "cpu"})
        config = json.loads((staging / "config.json").read_text())
        ranks, census = [], Counter()
        for rank in range(config["pretrained_config"]["mapping"]["world_size"]):
            model, meta = load_cpu_engine_rank(staging / f"rank{rank}.engine")
            refused = unsupported_features(model.args)
            if refused:
                raise PipelineError(f"build.backend={backend} cannot export this engine: " + "; ".join(refused))
            manifest = export_rank(model, meta["limits"], engine_dir, rank)
            census.update(manifest["op_census"])
            ranks.append(manifest)
            del model
        if (staging / "tokenizer").is_dir():
            shutil.copytree(staging / "tokenizer", engine_dir / "tokenizer")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    limits = config["build_config"]
    graphs = {"format_version": FORMAT_VERSION, "opset": 24, "profiles": profiles(limits), "versions": versions,
              "ranks": ranks}
    (engine_dir / GRAPHS_FILE).write_text(json.dumps(graphs, indent=2) + "\n")
    config["engine"] = {"backend": backend, "format_version": FORMAT_VERSION}
    (engine_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    onnx_bytes = sum(p.stat().st_size for p in engine_dir.glob("rank*.onnx*"))
    return {"onnx_bytes": onnx_bytes, "onnx_nodes": sum(census.values()), "onnx_op_census": dict(sorted(census.items())),
            "export_seconds": round(time.perf_counter() - started, 3)}


class OnnxBackend:
    name = "onnx"

    def environment(self, build_config: dict[str, Any]) -> dict[str, Any]:
        """What the artifact depends on beyond the checkpoint and the build config: the exporter's versions."""
        return {"torch": md.version("torch"), **package_versions(ONNX_PACKAGES)}

    def build(self, checkpoint_dir: Path, engine_dir: Path, build_config: dict[str, Any]) -> dict[str, Any]:
        metrics = export_engine(Path(checkpoint_dir), Path(engine_dir), build_config, self.name)
        metrics["engine_bytes"] = metrics["onnx_bytes"]
        metrics["build_seconds"] = metrics["export_seconds"]
        return metrics


BACKEND = OnnxBackend()
