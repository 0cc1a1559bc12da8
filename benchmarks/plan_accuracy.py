"""The plan's convert peak-RSS estimate against `/usr/bin/time`'s maximum resident set, on three model sizes, for an
HF source and for a TensorRT-LLM checkpoint source (resharding tp1 -> tp2). Prints one JSON line per case:

    python benchmarks/plan_accuracy.py [--workdir DIR]

Models: random Llama configs (2 layers, fp32) whose largest tensor (the 16k/32k/48k-row embedding) is 16, 62 and
188 MiB; each conversion runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = {"small": (256, 16000), "medium": (512, 32000), "large": (1024, 48000)}

MAKE = """
import sys, torch, transformers
h, v, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cfg = transformers.LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2,
                               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                               tie_word_embeddings=False)
torch.manual_seed(0)
transformers.LlamaForCausalLM(cfg).save_pretrained(out)
"""
CONVERT = """
import sys
from pathlib import Path
from pipeline.convert.converter import convert
from pipeline.convert.registry import MappingArgs
from pipeline.convert.sources import open_source
convert(open_source(sys.argv[1], Path(sys.argv[2])), Path(sys.argv[3]), "float32", MappingArgs(int(sys.argv[4])),
        progress=False)
"""


def measured_mib(*args: str) -> float:
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c", CONVERT, *args], cwd=REPO,
                          capture_output=True, text=True, check=True)
    return int(proc.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    from pipeline.plan import convert_plan

    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="plan-accuracy-"))
    for name, (hidden, vocab) in SIZES.items():
        model = work / name
        if not model.exists():
            subprocess.run([sys.executable, "-c", MAKE, str(hidden), str(vocab), str(model)], check=True,
                           capture_output=True)
        for source, path, tp in (("hf", model, 1), ("trtllm", work / f"{name}-tp1", 2)):
            config = {"model": {"source": source, "path": str(path), "package": None, "architecture": None},
                      "mapping": {"tp_size": tp, "pp_size": 1, "use_parallel_embedding": False,
                                  "embedding_sharding_dim": 0}, "dtype": "float32", "quantization": None}
            estimate = convert_plan(config)["convert_peak_rss_mib"]
            out = work / (f"{name}-tp1" if source == "hf" else f"{name}-tp2")
            got = measured_mib(source, str(path), str(out), str(tp))
            print(json.dumps({"model": name, "source": source, "estimate_mib": estimate, "measured_mib": round(got, 1),
                              "error": round((estimate - got) / got, 3)}), flush=True)


if __name__ == "__main__":
    main()
