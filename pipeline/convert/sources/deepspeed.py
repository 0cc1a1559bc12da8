"""DeepSpeed / Megatron-DeepSpeed checkpoints: `latest` + `global_stepN/`.

Weights come from `mp_rank_XX_model_states.pt` (`module`: a Megatron-named state dict; with the pipeline engine
`module` is empty) or from the pipeline engine's per-layer files `layer_XX-model_YY-model_states.pt` (XX the pipeline
layer, YY the tp rank). Layer files are ordered by XX: the first holds the embedding, the last the final norm (and an
untied output layer may follow it), the ones in between the transformer blocks (DeepSpeed's own checkpoint reader
orders them the same way). The training `args` in `mp_rank_00_model_states.pt` describe the model; that file is
unpickled with `argparse.Namespace` allow-listed. ZeRO optimizer partitions alone carry no model weights here:
DeepSpeed's `zero_to_fp32.py` (saved in the checkpoint directory) turns them into a state dict first.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from pipeline.convert.sources import register_source
from pipeline.convert.sources.container import Container
from pipeline.convert.sources.megatron import MegatronFamilySource, _args, megatron_args, resolve_iteration
from pipeline.convert.sources.megatron_weights import Shard, ShardGrid, check_grid
from pipeline.convert.sources.safe_load import MEGATRON_ARGS_GLOBALS, load_torch
from pipeline.errors import PipelineError

_MODEL_STATES = re.compile(r"^mp_rank_(\d{2})_model_states\.pt$")
_LAYER_FILE = re.compile(r"^layer_(\d{2,})-model_(\d{2})-model_states\.pt$")


@register_source("deepspeed")
class DeepSpeedSource(MegatronFamilySource):
    format_name = "deepspeed"

    def __init__(self, path: Path):
        self.root = resolve_iteration(path, "latest", "{}", "DeepSpeed")
        self._open_container(Container(self.root))

    def _open(self) -> None:
        c = self.container
        states = {int(m.group(1)): n for n in c.names() if (m := _MODEL_STATES.match(n))}
        layer_files = {(int(m.group(1)), int(m.group(2))): n for n in c.names() if (m := _LAYER_FILE.match(n))}
        if not states:
            zero = [n for n in c.names() if "optim_states" in n or n.startswith("zero_pp_rank_")]
            if zero:
                raise PipelineError(
                    f"{self.root} holds only ZeRO-partitioned states ({zero[0]}, ...), which carry no assembled "
                    "model weights; run DeepSpeed's zero_to_fp32.py (saved beside the checkpoint) to write a state "
                    "dict, then convert that")
            raise PipelineError(f"{self.root}: no DeepSpeed model states (mp_rank_XX_model_states.pt)")
        first = c.where(states[min(states)])
        state0 = load_torch(str(c.local_path(states[min(states)])), first, MEGATRON_ARGS_GLOBALS, mmap=True)
        ns = _args(state0, first)
        args = megatron_args(ns, first)
        has_module = isinstance(state0.get("module"), Mapping) and len(state0["module"]) > 0
        del state0
        if has_module:
            check_grid({(t, 0): n for t, n in states.items()}, args.tp, 1, str(self.root),
                       lambda t, p: f"mp_rank_{t:02d}_model_states.pt")
            if args.pp != 1:
                raise PipelineError(f"{first}: pipeline_model_parallel_size={args.pp} with weights in module: "
                                    "expected layer_XX-model_YY files")
            shards = {(t, 0): _module_shard(c, n) for t, n in states.items()}
            return self._finish(ShardGrid(shards, args.tp, 1, str(self.root)), args, ns)
        if not layer_files:
            raise PipelineError(f"{first} has no module weights and there are no layer_XX-model_YY-model_states.pt "
                                "files")
        layers = sorted({x for x, _ in layer_files})
        tps = sorted({t for _, t in layer_files})
        if tps != list(range(args.tp)):
            raise PipelineError(f"{self.root}: layer files exist for tp ranks {tps}, the args say "
                                f"tensor_model_parallel_size={args.tp}")
        for x in layers:
            for t in range(args.tp):
                if (x, t) not in layer_files:
                    raise PipelineError(f"{self.root}: layer_{x:02d}-model_{t:02d}-model_states.pt is missing")
        shards = {(t, 0): _pipe_shard(c, {x: layer_files[(x, t)] for x in layers}, args.num_layers,
                                      args.tied) for t in range(args.tp)}
        args.pp = 1  # the layer files are reassembled into one stage per tp rank
        self._finish(ShardGrid(shards, args.tp, 1, str(self.root)), args, ns)


def _module_shard(c: Container, name: str) -> Shard:
    where = c.where(name)

    def load() -> Mapping[str, Any]:
        state = load_torch(str(c.local_path(name)), where, MEGATRON_ARGS_GLOBALS, mmap=True)
        return state["module"]

    return Shard(where, load, releasable=True)


# Keys of the pipeline engine's layer files -> where they belong in the Megatron vocabulary.
_EMBED_KEYS = {"word_embeddings.weight": "embedding.word_embeddings.weight",
               "position_embeddings.weight": "embedding.position_embeddings.weight"}


def _pipe_shard(c: Container, files: dict[int, str], num_layers: int, tied: bool) -> Shard:
    """One tp rank's layer files as a single Megatron-named state dict: the embedding file first, then one file per
    transformer block, then the final norm (and, untied, the output layer)."""
    ordered = [files[x] for x in sorted(files)]
    where = c.where(ordered[0]) + f" (+{len(ordered) - 1} layer files)"

    def load() -> Mapping[str, Any]:
        pieces = [load_torch(str(c.local_path(n)), c.where(n), mmap=True) for n in ordered]
        block_ids = [i for i, p in enumerate(pieces)
                     if any(k.startswith(("input_layernorm.", "self_attention.")) for k in p)]
        blocks = len(block_ids)
        if blocks != num_layers:
            raise PipelineError(f"{where}: {blocks} transformer-block layer files, the args say "
                                f"num_layers={num_layers}")
        out: dict[str, Any] = {}
        for j, (n, p) in enumerate(zip(ordered, pieces)):
            if j in block_ids:
                i = block_ids.index(j)
                out.update({f"encoder.layers.{i}.{k}": v for k, v in p.items()})
            elif any(k in _EMBED_KEYS for k in p):
                if "embedding.word_embeddings.weight" in out:  # the tied head's copy on the last stage
                    continue
                out.update({_EMBED_KEYS[k]: v for k, v in p.items() if k in _EMBED_KEYS})
            elif set(p) <= {"weight", "bias"} and p:
                target = "encoder.final_layernorm" if "encoder.final_layernorm.weight" not in out else "output_layer"
                out.update({f"{target}.{k}": v for k, v in p.items()})
            elif p:
                raise PipelineError(f"{c.where(n)}: unrecognised pipeline layer with keys {sorted(p)[:4]}")
        return out

    return Shard(where, load, releasable=True)
