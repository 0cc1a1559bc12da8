"""Peak RSS of converting a sharded Megatron-family source (NeMo layout, source TP2 x PP2, extracted directory)
to a target mapping, against the model's size: resharding holds one layer, not the model.

    python benchmarks/megatron_reshard_memory.py [--layers 24 --hidden 1024 --target-tp 1 --target-pp 1]

Builds a random Llama-style source (bfloat16) in a temporary directory, then converts it in a fresh process and
reports that process's peak RSS (VmHWM), next to a process that only imports the converter (the baseline).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build(root: Path, layers: int, hidden: int, archive: bool) -> int:
    import torch

    sys.path.insert(0, str(REPO))
    from tests.convert import megatron_samples as ms

    heads, ffn, vocab = hidden // 64, int(hidden * 2.75), 32000
    glob = {"embedding.word_embeddings.weight": torch.randn(vocab, hidden, dtype=torch.bfloat16),
            "output_layer.weight": torch.randn(vocab, hidden, dtype=torch.bfloat16),
            "encoder.final_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    for i in range(layers):
        m = f"encoder.layers.{i}."
        glob.update({m + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                     m + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                     m + "self_attention.query_key_value.weight": torch.randn(3 * hidden, hidden, dtype=torch.bfloat16),
                     m + "self_attention.dense.weight": torch.randn(hidden, hidden, dtype=torch.bfloat16),
                     m + "mlp.dense_h_to_4h.weight": torch.randn(2 * ffn, hidden, dtype=torch.bfloat16),
                     m + "mlp.dense_4h_to_h.weight": torch.randn(hidden, ffn, dtype=torch.bfloat16)})
    size = sum(t.numel() * t.element_size() for t in glob.values())
    cfg = dict(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
               num_query_groups=heads, max_position_embeddings=4096, normalization="rmsnorm", layernorm_epsilon=1e-5,
               activation="fast-swiglu", bias=False, position_embedding_type="rope",
               share_embeddings_and_output_weights=False, tensor_model_parallel_size=2,
               pipeline_model_parallel_size=2)
    ms.write_nemo(root / "model", ms.shard(glob, 2, 2, gated=True), cfg, directory=not archive)
    del glob
    return size


CONVERT = """
import sys, pathlib
sys.path.insert(0, {repo!r})
from pipeline.convert.converter import convert
from pipeline.convert.registry import MappingArgs
from pipeline.convert.sources import open_source
if {run}:
    src = open_source("nemo", pathlib.Path({src!r}))
    convert(src, pathlib.Path({out!r}), "bfloat16", MappingArgs({tp}, {pp}), progress=False)
    src.close()
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork + exec)
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def peak(run: bool, src: Path, out: Path, tp: int, pp: int) -> float:
    code = CONVERT.format(repo=str(REPO), run=run, src=str(src), out=str(out), tp=tp, pp=pp)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(proc.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--target-tp", type=int, default=1)
    p.add_argument("--target-pp", type=int, default=1)
    p.add_argument("--archive", action="store_true", help="a .nemo tar instead of an extracted directory")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        size = build(root, a.layers, a.hidden, a.archive)
        base = peak(False, root / "model", root / "out", a.target_tp, a.target_pp)
        used = peak(True, root / "model", root / "out", a.target_tp, a.target_pp)
    print(json.dumps({"source": f"nemo {'archive' if a.archive else 'directory'}, {a.layers} layers, hidden {a.hidden}, bfloat16, source tp2 pp2",
                      "target": f"tp{a.target_tp} pp{a.target_pp}", "model_mb": round(size / 2**20, 1),
                      "baseline_rss_mb": round(base, 1), "peak_rss_mb": round(used, 1),
                      "above_baseline_mb": round(used - base, 1)}))


if __name__ == "__main__":
    main()
