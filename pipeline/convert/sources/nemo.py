"""NeMo checkpoints: a `.nemo` file (tar, plain or gzip, read in place) or its extracted directory, and NeMo 2
checkpoint directories (`context/` + `weights/`).

NeMo 1 (`model_config.yaml`): legacy Megatron GPT weights in `model_weights.ckpt` (source TP = PP = 1),
`mp_rank_XX/model_weights.ckpt` (PP = 1) or `tp_rank_XX_pp_rank_XXX/model_weights.ckpt`, or an mcore distributed
checkpoint in `model_weights/`. NeMo 2: `context/model.yaml` (its `config:` node holds mcore TransformerConfig
fields) and a distributed checkpoint in `weights/`. Configs are parsed with `yaml.safe_load` and only read: a
`_target_` is never imported. Tokenizer artifacts (`nemo:<uuid>_tokenizer.model` references) are looked up inside
the container and saved beside the converted checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import yaml

from pipeline.convert.sources import register_source
from pipeline.convert.sources.base import SourceModel
from pipeline.convert.sources.container import Container
from pipeline.convert.sources.dist_checkpoint import is_dist_checkpoint, open_dist_checkpoint
from pipeline.convert.sources.megatron_weights import (
    ContainerViewSource,
    HFView, MegatronArgs, MegatronWeights, Shard, ShardGrid, args_from_mapping, check_grid)
from pipeline.convert.sources.safe_load import load_torch
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

NEMO1_CONFIG = "model_config.yaml"
NEMO1_WEIGHTS = "model_weights.ckpt"
NEMO2_CONFIG = "context/model.yaml"
_MP_RANK = re.compile(r"^mp_rank_(\d{2})/model_weights\.ckpt$")
_TP_PP_RANK = re.compile(r"^tp_rank_(\d{2})_pp_rank_(\d{3})/model_weights\.ckpt$")


def read_yaml(container: Container, name: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(container.read_bytes(name))
    except yaml.YAMLError as e:
        raise PipelineError(f"{container.where(name)} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{container.where(name)} must hold a mapping")
    return data


@register_source("nemo")
class NemoSource(ContainerViewSource, SourceModel):
    def __init__(self, path: Path):
        self._open_container(Container(path))

    def _open(self) -> None:
        c = self.container
        if c.has(NEMO1_CONFIG):
            self.config_name = NEMO1_CONFIG
            cfg = read_yaml(c, NEMO1_CONFIG)
            args = args_from_mapping(cfg, c.where(NEMO1_CONFIG))
            self._tokenizer_cfg = cfg.get("tokenizer") or {}
            grid = self._nemo1_grid(args, cfg)
        elif c.has(NEMO2_CONFIG):
            self.config_name = NEMO2_CONFIG
            cfg = read_yaml(c, NEMO2_CONFIG)
            args = nemo2_args(cfg, c.where(NEMO2_CONFIG))
            self._tokenizer_cfg = {"nemo2_dir": "context/nemo_tokenizer/"}
            if not is_dist_checkpoint(c, "weights/"):
                raise PipelineError(f"{c.where('weights')}: no distributed checkpoint (weights/.metadata) found")
            grid = ShardGrid({(0, 0): open_dist_checkpoint(c, "weights/")}, 1, 1, c.where("weights"))
        else:
            raise PipelineError(f"{c.path}: not a NeMo checkpoint: neither {NEMO1_CONFIG} (NeMo 1 .nemo file or "
                                f"directory) nor {NEMO2_CONFIG} (NeMo 2 directory) is in it")
        self._tok_files = self._tokenizer_files()
        args.vocab_size = self._tokenizer_vocab_size()
        self.args = args
        self.view = HFView(MegatronWeights(grid, args), args)
        self.hf_config = self.view.hf_config

    def _nemo1_grid(self, args: MegatronArgs, cfg: Mapping[str, Any]) -> ShardGrid:
        c = self.container
        if cfg.get("mcore_gpt") and is_dist_checkpoint(c, "model_weights/"):
            return ShardGrid({(0, 0): open_dist_checkpoint(c, "model_weights/")}, 1, 1, c.where("model_weights"))
        found: dict[tuple[int, int], str] = {}
        for name in c.names():
            if name == NEMO1_WEIGHTS:
                found[(0, 0)] = name
            elif m := _MP_RANK.match(name):
                found[(int(m.group(1)), 0)] = name
            elif m := _TP_PP_RANK.match(name):
                found[(int(m.group(1)), int(m.group(2)))] = name
        if not found:
            raise PipelineError(f"{c.path}: no weights: expected {NEMO1_WEIGHTS}, mp_rank_XX/{NEMO1_WEIGHTS}, "
                                f"tp_rank_XX_pp_rank_XXX/{NEMO1_WEIGHTS} or a model_weights/ distributed checkpoint")
        if args.tp * args.pp == 1 and set(found) != {(0, 0)}:
            args.tp = 1 + max(t for t, _ in found)  # a config re-saved without its parallel sizes
            args.pp = 1 + max(p for _, p in found)
        check_grid(found, args.tp, args.pp, str(c.path), lambda t, p: _shard_name(t, p, args.pp, args.tp))
        shards = {key: self._shard(name) for key, name in found.items()}
        return ShardGrid(shards, args.tp, args.pp, str(c.path))

    def _shard(self, name: str) -> Shard:
        c = self.container
        where, local = c.where(name), c.local_path(name)

        def load() -> Mapping[str, Any]:
            if local is not None:
                state = load_torch(str(local), where, mmap=True)
            else:
                state = _lazy_or_whole(c, name, where)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]  # a Lightning checkpoint saved under the weights name
            if not isinstance(state, dict):
                raise PipelineError(f"{where} does not hold a state dict")
            return state

        return Shard(where, load, releasable=local is not None)

    # -- tokenizer ---------------------------------------------------------------------------------------------
    def _artifact(self, ref: Any) -> str | None:
        """The container member a tokenizer path refers to: `nemo:<name>`, or a path whose file name is a member."""
        if not isinstance(ref, str) or not ref:
            return None
        name = ref[len("nemo:"):] if ref.startswith("nemo:") else Path(ref).name
        if self.container.has(name):
            return name
        if ref.startswith("nemo:"):
            raise PipelineError(f"{self.container.where(self.config_name)}: tokenizer artifact {ref!r} is not in "
                                f"{self.container.path}")
        return None

    def _tokenizer_files(self) -> dict[str, str]:
        t = self._tokenizer_cfg
        if "nemo2_dir" in t:
            prefix = t["nemo2_dir"]
            return {n[len(prefix):]: n for n in self.container.names() if n.startswith(prefix) and "/" not in n[len(prefix):]}
        files = {}
        library = str(t.get("library", "")).lower()
        if library == "sentencepiece" and (m := self._artifact(t.get("model"))):
            files["tokenizer.model"] = m
        elif library in ("megatron", "huggingface", "") and (v := self._artifact(t.get("vocab_file"))):
            files["vocab.json"] = v
            if merges := self._artifact(t.get("merge_file")):
                files["merges.txt"] = merges
        return files

    def _tokenizer_vocab_size(self) -> int | None:
        f = self._tok_files
        if "tokenizer.json" in f:
            tok = json.loads(self.container.read_bytes(f["tokenizer.json"]))
            vocab = (tok.get("model") or {}).get("vocab") or {}
            ids = set(vocab.values() if isinstance(vocab, dict) else range(len(vocab)))
            ids |= {t["id"] for t in tok.get("added_tokens") or [] if isinstance(t, dict) and "id" in t}
            return len(ids) or None
        if "vocab.json" in f:
            return len(json.loads(self.container.read_bytes(f["vocab.json"])))
        if "tokenizer.model" in f:
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_proto=self.container.read_bytes(f["tokenizer.model"]))
            return sp.get_piece_size()
        return None

    def tokenizer(self):
        if not self._tok_files:
            return None
        import transformers

        with tempfile.TemporaryDirectory() as tmp:  # the small tokenizer artifacts only, never weights
            for out, member in self._tok_files.items():
                (Path(tmp) / out).write_bytes(self.container.read_bytes(member))
            if "tokenizer.json" in self._tok_files or "tokenizer_config.json" in self._tok_files:
                return transformers.AutoTokenizer.from_pretrained(tmp)
            if "tokenizer.model" in self._tok_files:  # a sentencepiece model, converted by transformers
                return transformers.LlamaTokenizer.from_pretrained(tmp, legacy=False)
            if "merges.txt" in self._tok_files:
                return gpt2_bpe_tokenizer(Path(tmp) / "vocab.json", Path(tmp) / "merges.txt")
        return None

    # -- SourceModel -------------------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        return {**self.container.fingerprint(content=(self.config_name,)), "source": "nemo"}

    def close(self) -> None:
        self.container.close()


def gpt2_bpe_tokenizer(vocab: Path, merges: Path):
    """Megatron's GPT2BPETokenizer files (vocab.json, merges.txt) as a transformers tokenizer."""
    import transformers

    lines = [ln for ln in merges.read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#version")]
    return transformers.GPT2TokenizerFast(vocab=json.loads(vocab.read_text(encoding="utf-8")), merges=lines)


def _lazy_or_whole(c: Container, name: str, where: str) -> Mapping[str, Any]:
    """An archive member's state dict as lazy tensor references (read on demand from the member), or, when the
    pickle holds more than a plain state dict, loaded whole through `torch.load(weights_only=True)`."""
    from pipeline.convert.sources.lazy_torch import LazyTorchFile, NotPlain

    try:
        return LazyTorchFile(c.open(name), where).state
    except NotPlain:
        with c.open(name) as f:
            return load_torch(f, where)


def _shard_name(tp: int, pp: int, pp_size: int, tp_size: int) -> str:
    if tp_size * pp_size == 1:
        return NEMO1_WEIGHTS
    return f"mp_rank_{tp:02d}/{NEMO1_WEIGHTS}" if pp_size == 1 else f"tp_rank_{tp:02d}_pp_rank_{pp:03d}/{NEMO1_WEIGHTS}"


_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "relu": "relu", "squared_relu": "squared-relu",
                "openai_gelu": "openai-gelu", "fast_gelu": "openai-gelu", "quick_gelu": "quick-gelu"}


def nemo2_args(model: Mapping[str, Any], where: str) -> MegatronArgs:
    """MegatronArgs from NeMo 2's `context/model.yaml` (mcore TransformerConfig fields under `config:`)."""
    cfg = model.get("config")
    if not isinstance(cfg, dict):
        raise PipelineError(f"{where}: no 'config:' mapping with the model's TransformerConfig fields")
    act = cfg.get("activation_func")
    target = act.get("_target_", "") if isinstance(act, dict) else str(act or "torch.nn.functional.gelu")
    base = _ACTIVATIONS.get(target.rsplit(".", 1)[-1], target.rsplit(".", 1)[-1])
    gated = bool(cfg.get("gated_linear_unit", False))
    activation = {"silu": "swiglu", "gelu": "geglu", "relu": "reglu"}.get(base, base) if gated else base
    norm = str(cfg.get("normalization", "LayerNorm")).lower()
    if norm == "layernorm" and cfg.get("layernorm_zero_centered_gamma"):
        norm = "layernorm1p"
    values = {
        **cfg, "activation": activation, "normalization": norm, "bias": cfg.get("add_bias_linear", True),
        "rotary_percentage": cfg.get("rotary_percent", 1.0),
        "max_position_embeddings": cfg.get("seq_length") or cfg.get("max_position_embeddings"),
        "position_embedding_type": cfg.get("position_embedding_type", "learned_absolute"),
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,  # global tensors: no source ranks
    }
    return args_from_mapping(values, where)
