"""Megatron-family weights (NeMo, Megatron-LM, Megatron-DeepSpeed) as HF-named tensors.

Three things every Megatron-style container shares, whatever wraps them:

1. `MegatronArgs`: the model description, read from the container's config (NeMo YAML, Megatron `args`).
2. A grid of source shards, one per (tensor-parallel rank, pipeline stage) of the training run. Keys are normalised
   to one vocabulary (legacy Megatron names: `encoder.layers.{i}.self_attention.query_key_value.weight`), whatever
   prefix (`model.`, `model.module.` of megatron_amp_O2, `language_model.`) or mcore spelling (`decoder.layers`,
   `linear_qkv`, TE-fused `layer_norm_weight`) the file uses. Layer indices are stage-local in the files; the
   global index is the local one plus the layers of the earlier stages.
3. `MegatronWeights`: merges the source tensor-parallel pieces of one tensor by its split rule (column: concatenate
   rows; row: concatenate columns; norms and row-parallel biases: replicated; gated fc1: each rank holds
   [gate_r; up_r], so halves are split per rank before concatenating), then presents the merged model under the
   names of its HF twin (`LlamaForCausalLM`, `GPT2LMHeadModel`): the fused QKV rows, grouped per KV group as
   [q heads of the group; k; v], are split into q/k/v; `layernorm1p` norms get their 1 added; vocabulary padding is
   cut to the tokenizer's size. The existing converter then writes and reshards to any target mapping.

Memory: tensors are read per layer. Shards opened from files on disk are memory-mapped and released whenever the
converter moves to another layer, so the resident set follows one layer's tensors (plus the merged copy), not the
model; shards inside an archive are lazy references (`lazy_torch`) whose bytes are read from the member on demand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from pipeline.errors import PipelineError

# -- the model description -------------------------------------------------------------------------------------

GATED = {"swiglu": "silu", "fast-swiglu": "silu", "geglu": "gelu", "fast-geglu": "gelu", "reglu": "relu",
         "fast-reglu": "relu"}
PLAIN = {"gelu": "gelu", "openai-gelu": "gelu_new", "relu": "relu", "silu": "silu"}


@dataclass
class MegatronArgs:
    """A Megatron-family decoder, in Megatron's own terms."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    max_positions: int
    normalization: str = "layernorm"  # layernorm | layernorm1p | rmsnorm
    eps: float = 1e-5
    activation: str = "gelu"  # Megatron's name (swiglu, gelu, openai-gelu, ...)
    bias: bool = True
    position: str = "learned_absolute"  # learned_absolute | rope | alibi
    rotary_base: float = 10000.0
    rotary_pct: float = 1.0
    rope_linear_factor: float | None = None
    tied: bool = True
    tp: int = 1
    pp: int = 1
    num_experts: int = 0
    top_k: int = 0
    moe_ffn_hidden_size: int | None = None  # each expert's inner size (default: ffn_hidden_size)
    # Real vocabulary size (tokenizer), when known; the embedding rows beyond it are Megatron's padding.
    vocab_size: int | None = None
    where: str = ""  # the config file, for messages

    @property
    def gated(self) -> bool:
        return self.activation in GATED

    @property
    def hf_activation(self) -> str:
        act = GATED.get(self.activation) or PLAIN.get(self.activation)
        if act is None:
            raise PipelineError(f"{self.where}: activation {self.activation!r} is not supported "
                                f"(supported: {sorted(GATED) + sorted(PLAIN)})")
        return act


def args_from_mapping(cfg: Mapping[str, Any], where: str, aliases: Mapping[str, tuple[str, ...]] = {}) -> MegatronArgs:
    """MegatronArgs from a NeMo model config or Megatron `args` (a dict of their fields); values are only read."""

    def get(key: str, default: Any = None) -> Any:
        for k in (key, *aliases.get(key, ())):
            if cfg.get(k) is not None:
                return cfg[k]
        return default

    def need(key: str) -> Any:
        value = get(key)
        if value is None:
            raise PipelineError(f"{where}: the model config lacks {key!r}")
        return value

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    position = str(get("position_embedding_type", "learned_absolute"))
    factor = get("seq_len_interpolation_factor")
    return MegatronArgs(
        num_layers=int(need("num_layers")), hidden_size=hidden, num_heads=heads,
        num_kv_heads=int(get("num_query_groups") or heads), head_dim=int(get("kv_channels") or hidden // heads),
        ffn_hidden_size=int(get("ffn_hidden_size") or 4 * hidden),
        max_positions=int(get("max_position_embeddings") or get("encoder_seq_length") or get("seq_length") or 2048),
        normalization=str(get("normalization", "layernorm")).lower(), eps=float(get("layernorm_epsilon", 1e-5)),
        activation=str(get("activation", "gelu")).lower(), bias=bool(get("bias", True)), position=position,
        rotary_base=float(get("rotary_base", 10000.0)), rotary_pct=float(get("rotary_percentage", 1.0)),
        rope_linear_factor=float(factor) if factor not in (None, 1, 1.0) else None,
        tied=bool(get("share_embeddings_and_output_weights", True)),
        tp=int(get("tensor_model_parallel_size", 1)), pp=int(get("pipeline_model_parallel_size", 1)),
        num_experts=int(get("num_moe_experts") or 0), top_k=int(get("moe_router_topk") or 2),
        moe_ffn_hidden_size=int(get("moe_ffn_hidden_size")) if get("moe_ffn_hidden_size") else None, where=where,
    )


# -- key normalisation -----------------------------------------------------------------------------------------

_PREFIXES = ("model.module.language_model.", "model.language_model.", "module.language_model.", "language_model.",
             "model.module.", "module.module.", "model.", "module.")
# mcore spellings -> the legacy vocabulary (order matters: the fused TE norms before the bare linear names).
_MCORE_RENAMES = (
    ("decoder.", "encoder."), ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias"),
    ("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_bias", "post_attention_layernorm.bias"),
    ("pre_mlp_layernorm.", "post_attention_layernorm."), ("linear_qkv.", "query_key_value."),
    ("linear_proj.", "dense."), ("linear_fc1.", "dense_h_to_4h."), ("linear_fc2.", "dense_4h_to_h."),
)
# Tensors that carry nothing for inference: TE's FP8 bookkeeping, RoPE's cached frequencies.
_SKIPPED = re.compile(r"(_extra_state|rotary_pos_emb\.inv_freq|\.inv_freq)$")


def normalize_key(key: str) -> str | None:
    """The legacy Megatron name of a state-dict key, or None for keys that are not weights."""
    if _SKIPPED.search(key):
        return None
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    if key.startswith("transformer."):  # Megatron-LM before the encoder/decoder split
        key = "encoder." + key[len("transformer."):]
    for old, new in _MCORE_RENAMES:
        key = key.replace(old, new)
    return key


_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")

# Split rule of each (layer-relative or global) legacy name, by suffix.
COLUMN, ROW, REPLICATED, GLU = "column", "row", "replicated", "glu"
_RULES = {
    "self_attention.query_key_value.weight": COLUMN, "self_attention.query_key_value.bias": COLUMN,
    "self_attention.dense.weight": ROW, "self_attention.dense.bias": REPLICATED,
    "mlp.dense_h_to_4h.weight": COLUMN, "mlp.dense_h_to_4h.bias": COLUMN,
    "mlp.dense_4h_to_h.weight": ROW, "mlp.dense_4h_to_h.bias": REPLICATED,
    "input_layernorm.weight": REPLICATED, "input_layernorm.bias": REPLICATED,
    "post_attention_layernorm.weight": REPLICATED, "post_attention_layernorm.bias": REPLICATED,
    "embedding.word_embeddings.weight": COLUMN, "embedding.position_embeddings.weight": REPLICATED,
    "encoder.final_layernorm.weight": REPLICATED, "encoder.final_layernorm.bias": REPLICATED,
    "output_layer.weight": COLUMN, "mlp.router.weight": REPLICATED,
}
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.\d+\.")


def rule_of(suffix: str) -> str:
    """The split rule of a layer-relative name; one expert's linears split like the dense MLP's."""
    return _RULES[_EXPERT.sub("mlp.", suffix)]


# -- shards ----------------------------------------------------------------------------------------------------

class Shard:
    """One source rank's tensors under normalised names. `load` returns the raw state dict (a fresh, possibly
    memory-mapped load); `releasable` shards are dropped between layers and loaded again on demand."""

    def __init__(self, where: str, load: Callable[[], Mapping[str, Any]], releasable: bool):
        self.where = where
        self._load = load
        self.releasable = releasable
        self._tensors: dict[str, torch.Tensor] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {k: tuple(t.shape) for k, t in self.tensors().items()}
        self.release()

    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            state = flatten(self._load())
            tensors: dict[str, torch.Tensor] = {}
            for key, value in state.items():
                name = normalize_key(key)
                if name is None or value is None:
                    continue
                if not isinstance(value, torch.Tensor) and not hasattr(value, "load"):
                    raise PipelineError(f"{self.where}: entry {key!r} is a {type(value).__name__}, not a tensor")
                if name in tensors:
                    raise PipelineError(f"{self.where}: {key!r} and another key both name {name}")
                tensors[name] = value
            self._tensors = tensors
        return self._tensors

    def get(self, name: str) -> torch.Tensor:
        value = self.tensors()[name]
        return value.load() if hasattr(value, "load") else value  # a lazy reference reads its bytes now

    def release(self) -> None:
        if self.releasable:
            self._tensors = None


def flatten(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested state dicts (legacy Megatron-LM saves `language_model` -> `embedding` -> `word_embeddings` -> ...)
    as flat dotted names."""
    flat: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass
class ShardGrid:
    """Shards by (tp_rank, pp_rank), all present: tp x pp of them."""

    shards: dict[tuple[int, int], Shard]
    tp: int
    pp: int
    what: str = "checkpoint"
    layer_offsets: list[int] = field(default_factory=list)

    def stage(self, pp_rank: int) -> list[Shard]:
        return [self.shards[(t, pp_rank)] for t in range(self.tp)]


def check_grid(found: Mapping[tuple[int, int], Any], tp: int, pp: int, where: str, describe: Callable[[int, int], str]) -> None:
    """Every (tp, pp) shard the config's parallel sizes imply exists, and no other."""
    want = {(t, p) for t in range(tp) for p in range(pp)}
    missing = sorted(want - set(found))
    if missing:
        raise PipelineError(f"{where}: shard {describe(*missing[0])} is missing (the config says "
                            f"tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp})")
    extra = sorted(set(found) - want)
    if extra:
        raise PipelineError(f"{where}: shard {describe(*extra[0])} does not fit the config's "
                            f"tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp}")


# -- merging ---------------------------------------------------------------------------------------------------

class MegatronWeights:
    """The merged (source-TP-free, global-layer) tensors of a shard grid, one layer at a time."""

    def __init__(self, grid: ShardGrid, args: MegatronArgs):
        self.grid, self.args = grid, args
        self._layer_home: dict[int, tuple[int, int]] = {}  # global layer -> (pp_rank, local index)
        self._global_home: dict[str, int] = {}  # non-layer name -> pp_rank holding it
        self._index_layers()
        self._check_tp_sizes()
        self._cache_layer: int | None = None
        self._cache: dict[str, torch.Tensor] = {}

    # layout of the grid
    def _index_layers(self) -> None:
        g = self.grid
        offset = 0
        for p in range(g.pp):
            stage = g.stage(p)
            names = set(stage[0].shapes)
            for s in stage[1:]:
                diff = sorted(names ^ set(s.shapes))
                if diff:
                    owner = stage[0] if diff[0] in names else s
                    other = s if owner is stage[0] else stage[0]
                    raise PipelineError(f"{other.where} lacks tensor {diff[0]} that {owner.where} holds "
                                        "(shards of one pipeline stage must hold the same tensors)")
            locals_ = sorted({int(m.group(1)) for n in names if (m := _LAYER.match(n))})
            if locals_ != list(range(len(locals_))):
                raise PipelineError(f"{stage[0].where}: layer indices {locals_} are not 0..{len(locals_) - 1}")
            for local in locals_:
                self._layer_home[offset + local] = (p, local)
            offset += len(locals_)
            for n in names:
                if not _LAYER.match(n):
                    if n not in _RULES:
                        raise PipelineError(f"{stage[0].where}: tensor {n} is not a known Megatron GPT weight")
                    self._global_home.setdefault(n, p)
                    if n in ("encoder.final_layernorm.weight", "encoder.final_layernorm.bias", "output_layer.weight"):
                        self._global_home[n] = p  # the last stage holding it
        if offset != self.args.num_layers:
            raise PipelineError(f"{self.grid.what}: the shards hold {offset} layers, the config says num_layers="
                                f"{self.args.num_layers}")

    def _check_tp_sizes(self) -> None:
        """Each shard's QKV must hold exactly its rank's heads: a shard saved with another TP size is refused."""
        a = self.args
        want = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim // self.grid.tp
        for p in range(self.grid.pp):
            for s in self.grid.stage(p):
                for n, shape in s.shapes.items():
                    if n.endswith("self_attention.query_key_value.weight") and shape[0] != want:
                        raise PipelineError(
                            f"{s.where}: {n} has {shape[0]} rows, expected {want} for tensor_model_parallel_size="
                            f"{self.grid.tp} (heads={a.num_heads}, query groups={a.num_kv_heads}, "
                            f"head dim={a.head_dim}); was the shard saved with another tensor-parallel size?")

    def has(self, name: str) -> bool:
        m = _LAYER.match(name)
        if m:
            home = self._layer_home.get(int(m.group(1)))
            return home is not None and f"encoder.layers.{home[1]}.{m.group(2)}" in self.grid.stage(home[0])[0].shapes
        return name in self._global_home

    def _locate(self, name: str) -> tuple[list[Shard], str, str]:
        m = _LAYER.match(name)
        if m:
            p, local = self._layer_home[int(m.group(1))]
            return self.grid.stage(p), f"encoder.layers.{local}.{m.group(2)}", m.group(2)
        return self.grid.stage(self._global_home[name]), name, name

    def _rule(self, suffix: str) -> str:
        rule = rule_of(suffix)
        glu = _EXPERT.sub("mlp.", suffix).startswith("mlp.dense_h_to_4h") and self.args.gated
        return GLU if rule == COLUMN and glu else rule

    def where(self, name: str) -> str:
        shards, _, _ = self._locate(name)
        return shards[0].where if len(shards) == 1 else f"{shards[0].where} (+{len(shards) - 1} tp shards)"

    def shape(self, name: str) -> tuple[int, ...]:
        shards, local, suffix = self._locate(name)
        parts = [torch.empty(s.shapes[local], device="meta") for s in shards]
        return tuple(merge(parts, self._rule(suffix)).shape)

    def tensor(self, name: str) -> torch.Tensor:
        """The merged tensor; per-layer tensors are cached until another layer is asked for (then the
        memory-mapped shards are released, so their pages leave the resident set)."""
        m = _LAYER.match(name)
        layer = int(m.group(1)) if m else None
        if layer != self._cache_layer:
            self._cache.clear()
            for s in self.grid.shards.values():
                s.release()
            self._cache_layer = layer
        if name not in self._cache:
            shards, local, suffix = self._locate(name)
            try:
                parts = [s.get(local) for s in shards]
            except KeyError:
                raise PipelineError(f"{name} is missing from a shard of {self.grid.what}") from None
            merged = merge(parts, self._rule(suffix))
            self._cache[name] = merged.clone() if merged.data_ptr() == parts[0].data_ptr() else merged
        return self._cache[name]


def merge(parts: list[torch.Tensor], rule: str) -> torch.Tensor:
    if len(parts) == 1 or rule == REPLICATED:
        return parts[0]
    if rule == COLUMN:
        return torch.cat(parts, 0)
    if rule == ROW:
        return torch.cat(parts, parts[0].dim() - 1)
    halves = [p.chunk(2, 0) for p in parts]  # GLU: each rank holds [gate_r; up_r]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)


# -- the HF view -----------------------------------------------------------------------------------------------

Builder = Callable[[Callable[[str], torch.Tensor]], torch.Tensor]


def qkv_slice(args: MegatronArgs, part: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """q (0), k (1) or v (2) out of Megatron's fused rows [per KV group: its q heads, its k head, its v head]."""
    per_group = args.num_heads // args.num_kv_heads

    def take(t: torch.Tensor) -> torch.Tensor:
        grouped = t.reshape(args.num_kv_heads, per_group + 2, args.head_dim, *t.shape[1:])
        start, size = ((0, per_group), (per_group, 1), (per_group + 1, 1))[part]
        return grouped.narrow(1, start, size).reshape(-1, *t.shape[1:])

    return take


class HFView:
    """HF names -> how to build each from merged Megatron tensors; chooses the HF twin architecture."""

    def __init__(self, weights: MegatronWeights, args: MegatronArgs):
        self.w, self.args = weights, args
        a = args
        if a.num_heads % a.num_kv_heads:
            raise PipelineError(f"{a.where}: num_attention_heads={a.num_heads} is not a multiple of "
                                f"num_query_groups={a.num_kv_heads}")
        rows = weights.shape("embedding.word_embeddings.weight")[0]
        self.vocab = a.vocab_size if a.vocab_size and a.vocab_size <= rows else rows
        family = self._family()
        self.builders: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {}
        (self._gpt2 if family == "gpt" else self._llama)()
        self.hf_config = self._gpt2_config() if family == "gpt" else self._llama_config()
        if family == "mixtral":
            if weights.grid.tp > 1:
                raise PipelineError(f"{a.where}: mixture-of-experts weights from tensor-parallel shards "
                                    f"(tensor_model_parallel_size={weights.grid.tp}) are not supported; a "
                                    "distributed (torch_dist) checkpoint or a tp1 source converts")
            self._experts()
            inner = a.moe_ffn_hidden_size or a.ffn_hidden_size
            self.hf_config.update(architectures=["MixtralForCausalLM"], model_type="mixtral",
                                  intermediate_size=inner, num_local_experts=a.num_experts,
                                  num_experts_per_tok=a.top_k)

    def _family(self) -> str:
        a = self.args
        llama_like = a.normalization == "rmsnorm" and a.gated and a.position == "rope" and a.rotary_pct == 1.0 \
            and a.hf_activation == "silu"
        if a.num_experts:
            if llama_like and not a.bias:
                return "mixtral"
            raise PipelineError(f"{a.where}: mixture-of-experts models convert when Mixtral-style (rmsnorm, swiglu "
                                f"experts, rope, no bias); got normalization={a.normalization}, activation="
                                f"{a.activation}, position_embedding_type={a.position}, bias={a.bias}")
        if llama_like:
            return "llama"
        if a.normalization in ("layernorm", "layernorm1p") and not a.gated and a.position in ("learned_absolute", "alibi") \
                and a.num_kv_heads == a.num_heads and a.bias:
            a.hf_activation  # noqa: B018 - refuses unknown activations
            return "gpt"
        raise PipelineError(
            f"{a.where}: this Megatron model (normalization={a.normalization}, activation={a.activation}, "
            f"position_embedding_type={a.position}, rotary_percentage={a.rotary_pct}, query groups={a.num_kv_heads} "
            f"of {a.num_heads} heads, bias={a.bias}) has no converter; supported: Llama-style (rmsnorm, swiglu, "
            "rope, any query groups) as LlamaForCausalLM, and GPT (layernorm or layernorm1p, non-gated activation, "
            "learned or ALiBi positions, multi-head attention, biases) as GPTForCausalLM")

    # builders: HF name -> (merged Megatron name, function of that tensor)
    def _add(self, hf: str, megatron: str, fn: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        if self.w.has(megatron):
            self.builders[hf] = (megatron, fn)

    def _norm(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() + 1.0 if self.args.normalization == "layernorm1p" else t

    def _vocab(self, t: torch.Tensor) -> torch.Tensor:
        return t[: self.vocab]

    def _llama(self) -> None:
        a, f = self.args, self.args.ffn_hidden_size
        self._add("model.embed_tokens.weight", "embedding.word_embeddings.weight", self._vocab)
        if not a.tied:
            self._add("lm_head.weight", "output_layer.weight", self._vocab)
        self._add("model.norm.weight", "encoder.final_layernorm.weight", self._norm)
        for i in range(a.num_layers):
            src, hf = f"encoder.layers.{i}.", f"model.layers.{i}."
            self._add(hf + "input_layernorm.weight", src + "input_layernorm.weight", self._norm)
            self._add(hf + "post_attention_layernorm.weight", src + "post_attention_layernorm.weight", self._norm)
            for kind in ("weight", "bias"):
                for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    self._add(f"{hf}self_attn.{proj}.{kind}", f"{src}self_attention.query_key_value.{kind}",
                              qkv_slice(a, part))
                self._add(f"{hf}self_attn.o_proj.{kind}", f"{src}self_attention.dense.{kind}")
                self._add(f"{hf}mlp.gate_proj.{kind}", f"{src}mlp.dense_h_to_4h.{kind}", lambda t: t[:f])
                self._add(f"{hf}mlp.up_proj.{kind}", f"{src}mlp.dense_h_to_4h.{kind}", lambda t: t[f:])
                self._add(f"{hf}mlp.down_proj.{kind}", f"{src}mlp.dense_4h_to_h.{kind}")

    def _experts(self) -> None:
        """Mixtral names: router -> block_sparse_moe.gate, each expert's fc1 [gate; up] -> w1 / w3, fc2 -> w2."""
        a = self.args
        inner = a.moe_ffn_hidden_size or a.ffn_hidden_size
        for i in range(a.num_layers):
            src, hf = f"encoder.layers.{i}.mlp.", f"model.layers.{i}.block_sparse_moe."
            self._add(hf + "gate.weight", src + "router.weight")
            for e in range(a.num_experts):
                ex = f"{src}experts.local_experts.{e}."
                self._add(f"{hf}experts.{e}.w1.weight", ex + "dense_h_to_4h.weight", lambda t: t[:inner])
                self._add(f"{hf}experts.{e}.w3.weight", ex + "dense_h_to_4h.weight", lambda t: t[inner:])
                self._add(f"{hf}experts.{e}.w2.weight", ex + "dense_4h_to_h.weight")

    def _gpt2(self) -> None:
        a = self.args

        def fused(t: torch.Tensor) -> torch.Tensor:  # [q; k; v] rows, as GPT-2's c_attn (Conv1D: (in, out))
            qkv = torch.cat([qkv_slice(a, p)(t) for p in range(3)], 0)
            return qkv.t() if qkv.dim() == 2 else qkv

        def conv1d(t: torch.Tensor) -> torch.Tensor:
            return t.t() if t.dim() == 2 else t

        self._add("transformer.wte.weight", "embedding.word_embeddings.weight", self._vocab)
        self._add("transformer.wpe.weight", "embedding.position_embeddings.weight")
        if not a.tied:
            self._add("lm_head.weight", "output_layer.weight", self._vocab)
        self._add("transformer.ln_f.weight", "encoder.final_layernorm.weight", self._norm)
        self._add("transformer.ln_f.bias", "encoder.final_layernorm.bias")
        for i in range(a.num_layers):
            src, hf = f"encoder.layers.{i}.", f"transformer.h.{i}."
            for ln, name in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
                self._add(f"{hf}{ln}.weight", f"{src}{name}.weight", self._norm)
                self._add(f"{hf}{ln}.bias", f"{src}{name}.bias")
            for kind in ("weight", "bias"):
                self._add(f"{hf}attn.c_attn.{kind}", f"{src}self_attention.query_key_value.{kind}", fused)
                self._add(f"{hf}attn.c_proj.{kind}", f"{src}self_attention.dense.{kind}", conv1d)
                self._add(f"{hf}mlp.c_fc.{kind}", f"{src}mlp.dense_h_to_4h.{kind}", conv1d)
                self._add(f"{hf}mlp.c_proj.{kind}", f"{src}mlp.dense_4h_to_h.{kind}", conv1d)

    def _llama_config(self) -> dict[str, Any]:
        a = self.args
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab,
               "hidden_size": a.hidden_size, "intermediate_size": a.ffn_hidden_size,
               "num_hidden_layers": a.num_layers, "num_attention_heads": a.num_heads,
               "num_key_value_heads": a.num_kv_heads, "head_dim": a.head_dim, "hidden_act": "silu",
               "max_position_embeddings": a.max_positions, "rms_norm_eps": a.eps, "rope_theta": a.rotary_base,
               "tie_word_embeddings": a.tied, "attention_bias": a.bias, "mlp_bias": a.bias}
        if a.rope_linear_factor:
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": a.rope_linear_factor}
        return cfg

    def _gpt2_config(self) -> dict[str, Any]:
        a = self.args
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": self.vocab,
                "n_embd": a.hidden_size, "n_layer": a.num_layers, "n_head": a.num_heads,
                "n_positions": a.max_positions, "n_inner": a.ffn_hidden_size,
                "activation_function": a.hf_activation, "layer_norm_epsilon": a.eps, "tie_word_embeddings": a.tied,
                "position_embedding_type": a.position}

    # SourceModel-like access
    def names(self) -> set[str]:
        return set(self.builders)

    def shape(self, name: str) -> tuple[int, ...]:
        megatron, fn = self.builders[name]
        return tuple(fn(torch.empty(self.w.shape(megatron), device="meta")).shape)

    def read(self, name: str) -> torch.Tensor:
        megatron, fn = self.builders[name]
        return fn(self.w.tensor(megatron)).contiguous()

    def where(self, name: str) -> str:
        return self.w.where(self.builders[name][0])


class ContainerViewSource:
    """The tail every Megatron-family source shares: open a container (closed again if opening fails) and present
    the merged model through its `HFView` (`self.view`). Mixed in before `SourceModel`."""

    container: Any
    view: HFView

    def _open_container(self, container: Any) -> None:
        self.container = container
        try:
            self._open()
        except BaseException:
            container.close()
            raise

    def _open(self) -> None:
        raise NotImplementedError

    def names(self) -> set[str]:
        return self.view.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.view.shape(name)

    def read(self, name: str) -> torch.Tensor:
        return self.view.read(name)

    def where(self, name: str) -> str:
        return self.view.where(name)
