"""Megatron-LM checkpoints: `latest_checkpointed_iteration.txt` + `iter_XXXXXXX/` (or `release/`), with legacy
per-rank files (`mp_rank_XX/model_optim_rng.pt`, `mp_rank_XX_YYY/...` with pipeline stages) or an mcore `torch_dist`
directory (`common.pt` + `.metadata` + `*.distcp`).

The model description comes from the checkpoint's stored `args` (an `argparse.Namespace`), unpickled with that one
class allow-listed next to tensors and containers. `model.path` may be the checkpoint root or one iteration
directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping


from pipeline.convert.sources import register_source
from pipeline.convert.sources.base import SourceModel
from pipeline.convert.sources.container import Container
from pipeline.convert.sources.dist_checkpoint import open_dist_checkpoint
from pipeline.convert.sources.megatron_weights import (
    ContainerViewSource,
    HFView, MegatronArgs, MegatronWeights, Shard, ShardGrid, args_from_mapping, check_grid)
from pipeline.convert.sources.safe_load import MEGATRON_ARGS_GLOBALS, load_torch
from pipeline.errors import PipelineError

TRACKER = "latest_checkpointed_iteration.txt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")

# Megatron-LM / Megatron-DeepSpeed argument names -> the NeMo-style keys args_from_mapping reads.
ARG_ALIASES: dict[str, tuple[str, ...]] = {
    "num_query_groups": ("num_key_value_heads",), "layernorm_epsilon": ("norm_epsilon",),
    "rotary_percentage": ("rotary_percent",), "max_position_embeddings": ("seq_length",),
}


def megatron_args(ns: Any, where: str) -> MegatronArgs:
    """MegatronArgs from Megatron-LM / Megatron-DeepSpeed training arguments (only read, never called)."""
    a = dict(vars(ns)) if not isinstance(ns, Mapping) else dict(ns)
    if not a.get("group_query_attention", "num_key_value_heads" in a):
        a["num_query_groups"] = None
    norm = str(a.get("normalization") or "layernorm").lower()
    if a.get("apply_layernorm_1p") or (norm == "layernorm" and a.get("layernorm_zero_centered_gamma")):
        norm = "layernorm1p"
    act = "swiglu" if a.get("swiglu") else "openai-gelu" if a.get("openai_gelu") else \
        "squared-relu" if a.get("squared_relu") else "gelu"
    position = a.get("position_embedding_type") or ("rope" if a.get("use_rotary_position_embeddings")
                                                    else "learned_absolute")
    bias = a.get("add_bias_linear", not a.get("disable_bias_linear", False))
    values = {**a, "normalization": norm, "activation": act, "position_embedding_type": position, "bias": bias,
              "share_embeddings_and_output_weights": not a.get("untie_embeddings_and_output_weights", False),
              "num_moe_experts": a.get("num_experts")}
    return args_from_mapping(values, where, ARG_ALIASES)


def tokenizer_vocab_size(args_ns: Any, root: Path) -> tuple[int | None, dict[str, Path]]:
    """The real vocabulary size and tokenizer files, from the training arguments' tokenizer paths when those files
    exist (as given, or by name in the checkpoint directory)."""
    a = vars(args_ns) if not isinstance(args_ns, Mapping) else args_ns
    found: dict[str, Path] = {}
    for key, out in (("vocab_file", "vocab.json"), ("merge_file", "merges.txt"), ("tokenizer_model", "tokenizer.model")):
        ref = a.get(key)
        if not ref:
            continue
        for cand in (Path(ref), root / Path(ref).name):
            if cand.is_file():
                found[out] = cand
                break
    if "vocab.json" in found and found["vocab.json"].suffix == ".json":
        import json

        return len(json.loads(found["vocab.json"].read_text())), found
    if "tokenizer.model" in found:
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=str(found["tokenizer.model"])).get_piece_size(), found
    return None, {}


class MegatronFamilySource(ContainerViewSource, SourceModel):
    """Shared tail of the Megatron-LM and DeepSpeed sources: an HF view over merged shards."""

    format_name = "megatron"

    def _finish(self, grid: ShardGrid, args: MegatronArgs, args_ns: Any) -> None:
        args.vocab_size, self._tok_files = tokenizer_vocab_size(args_ns, self.root)
        self.view = HFView(MegatronWeights(grid, args), args)
        self.hf_config = self.view.hf_config

    def fingerprint(self) -> dict[str, Any]:
        return {**self.container.fingerprint(), "source": self.format_name}

    def tokenizer(self):
        import transformers

        f = self._tok_files
        if "merges.txt" in f and "vocab.json" in f:
            from pipeline.convert.sources.nemo import gpt2_bpe_tokenizer

            return gpt2_bpe_tokenizer(f["vocab.json"], f["merges.txt"])
        if "tokenizer.model" in f:  # a sentencepiece model, converted by transformers
            import shutil
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                shutil.copyfile(f["tokenizer.model"], Path(tmp) / "tokenizer.model")
                return transformers.LlamaTokenizer.from_pretrained(tmp, legacy=False)
        return None

    def close(self) -> None:
        self.container.close()


def resolve_iteration(path: Path, tracker: str, pattern: str, what: str) -> Path:
    """The iteration directory: `path` itself when it is one, else the one the tracker file names."""
    if not path.is_dir():
        raise PipelineError(f"model.path: {path} is not a directory ({what} checkpoints are directories)")
    if (path / tracker).is_file():
        tag = (path / tracker).read_text().strip()
        name = tag if (tag == "release" or not tag.isdigit() or pattern == "{}") else pattern.format(int(tag))
        it = path / name
        if not it.is_dir():
            raise PipelineError(f"{path / tracker} names {tag!r} but {it} does not exist")
        return it
    return path


@register_source("megatron")
class MegatronSource(MegatronFamilySource):
    format_name = "megatron"

    def __init__(self, path: Path):
        self.root = resolve_iteration(path, TRACKER, "iter_{:07d}", "Megatron-LM")
        self._open_container(Container(self.root))

    def _open(self) -> None:
        c = self.container
        if c.has(".metadata") or c.has("metadata.json"):
            common = "common.pt"
            if not c.has(common):
                raise PipelineError(f"{c.where(common)} is missing (it holds the training args)")
            state = load_torch(str(c.local_path(common)), c.where(common), MEGATRON_ARGS_GLOBALS)
            ns = _args(state, c.where(common))
            args = megatron_args(ns, c.where(common))
            grid = ShardGrid({(0, 0): open_dist_checkpoint(c, "")}, 1, 1, str(self.root))
            return self._finish(grid, args, ns)
        found: dict[tuple[int, int], str] = {}
        for name in c.names():
            parts = name.split("/")
            if len(parts) == 2 and parts[1] == "model_optim_rng.pt" and (m := _RANK_DIR.match(parts[0])):
                found[(int(m.group(1)), int(m.group(2) or 0))] = name
        if not found:
            raise PipelineError(f"{self.root}: no Megatron-LM weights (mp_rank_XX/model_optim_rng.pt, "
                                "mp_rank_XX_YYY/model_optim_rng.pt, or a torch_dist .metadata)")
        first = found[min(found)]
        ns = _args(load_torch(str(c.local_path(first)), c.where(first), MEGATRON_ARGS_GLOBALS), c.where(first))
        args = megatron_args(ns, c.where(first))
        with_pp = any(name.split("/")[0].count("_") == 3 for name in found.values())
        check_grid(found, args.tp, args.pp, str(self.root),
                   lambda t, p: f"mp_rank_{t:02d}{f'_{p:03d}' if with_pp else ''}/model_optim_rng.pt")
        shards = {key: _model_shard(c, name, "model") for key, name in found.items()}
        self._finish(ShardGrid(shards, args.tp, args.pp, str(self.root)), args, ns)


def _args(state: Any, where: str) -> Any:
    ns = state.get("args") if isinstance(state, dict) else None
    if ns is None:
        raise PipelineError(f"{where} holds no 'args' (the training arguments that describe the model)")
    return ns


def _model_shard(c: Container, name: str, key: str) -> Shard:
    where, local = c.where(name), c.local_path(name)

    def load() -> Mapping[str, Any]:
        state = load_torch(str(local), where, MEGATRON_ARGS_GLOBALS, mmap=True)
        if not isinstance(state, dict):
            raise PipelineError(f"{where} does not hold a checkpoint dict")
        if "model0" in state and key not in state:
            raise PipelineError(f"{where}: virtual pipeline stages (model0, model1, ...) are not supported")
        model = state.get(key)
        if not isinstance(model, Mapping):
            raise PipelineError(f"{where} holds no {key!r} weights")
        return model

    return Shard(where, load, releasable=True)
