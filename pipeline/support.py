"""The support table the README carries (what converts, with which mappings, and what the cpu engine runs), generated
from the architecture registry and the cpu engine's layouts; a test keeps the README's copy equal. A module of its
own: the registry is below the engine (the engine validates checkpoints through it), so the registry cannot import
the engine."""

from __future__ import annotations

from pipeline.convert.registry import get_spec, supported_architectures
from pipeline.engine.cpu import RUNTIME_LAYOUTS


def support_table() -> str:
    """The Markdown table of what converts and runs, generated from the registry (the README carries it, and a
    test keeps the two equal)."""
    rows = ["| source architecture | written as | tp | pp | dtypes | cpu engine |", "|---|---|---|---|---|---|"]
    for arch in supported_architectures():
        spec = get_spec(arch)
        pp = "yes" if spec.supports_pp else "no (as in TensorRT-LLM)"
        engine = "yes" if spec.writes_as in RUNTIME_LAYOUTS else "no"
        rows.append(f"| `{arch}` | `{spec.writes_as}` | yes | {pp} | float32, float16, bfloat16 | {engine} |")
    return "\n".join(rows)
