"""GGUF files (llama.cpp): metadata becomes an HF-style config, tensors are dequantized to float32 one at a time
and presented under HF names, with llama.cpp's Q/K row permutation undone where its converter applied one, and
(Gemma) the 1 its converter added to every RMSNorm weight taken off again, as transformers' GGUF loader does."""

from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.convert.sources import register_source
from pipeline.convert.sources.base import SourceModel
from pipeline.convert.sources.files import fingerprint_prefix
from pipeline.convert.sources.gguf_header import GGUFHeader, GGUFHeaderError, GGUFTensorInfo, read_gguf_header
from pipeline.errors import PipelineError


# GGUF tensor names -> HF names ({layer} = block index) of the Llama-shaped archs.
GGUF_TO_HF_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{layer}.attn_norm.weight": "model.layers.{layer}.input_layernorm.weight",
    "blk.{layer}.attn_q.weight": "model.layers.{layer}.self_attn.q_proj.weight",
    "blk.{layer}.attn_k.weight": "model.layers.{layer}.self_attn.k_proj.weight",
    "blk.{layer}.attn_v.weight": "model.layers.{layer}.self_attn.v_proj.weight",
    "blk.{layer}.attn_q.bias": "model.layers.{layer}.self_attn.q_proj.bias",
    "blk.{layer}.attn_k.bias": "model.layers.{layer}.self_attn.k_proj.bias",
    "blk.{layer}.attn_v.bias": "model.layers.{layer}.self_attn.v_proj.bias",
    "blk.{layer}.attn_output.weight": "model.layers.{layer}.self_attn.o_proj.weight",
    "blk.{layer}.ffn_norm.weight": "model.layers.{layer}.post_attention_layernorm.weight",
    "blk.{layer}.ffn_gate.weight": "model.layers.{layer}.mlp.gate_proj.weight",
    "blk.{layer}.ffn_up.weight": "model.layers.{layer}.mlp.up_proj.weight",
    "blk.{layer}.ffn_down.weight": "model.layers.{layer}.mlp.down_proj.weight",
}

# Gemma3: four norms per block (llama.cpp's ffn_norm is the pre-feed-forward one) and per-head q/k norms.
GEMMA3_GGUF_NAMES: dict[str, str] = {
    **GGUF_TO_HF_NAMES,
    "blk.{layer}.attn_q_norm.weight": "model.layers.{layer}.self_attn.q_norm.weight",
    "blk.{layer}.attn_k_norm.weight": "model.layers.{layer}.self_attn.k_norm.weight",
    "blk.{layer}.post_attention_norm.weight": "model.layers.{layer}.post_attention_layernorm.weight",
    "blk.{layer}.ffn_norm.weight": "model.layers.{layer}.pre_feedforward_layernorm.weight",
    "blk.{layer}.post_ffw_norm.weight": "model.layers.{layer}.post_feedforward_layernorm.weight",
}


@dataclass(frozen=True)
class GGUFArch:
    """How one `general.architecture` of GGUF maps onto an HF architecture."""

    hf_architecture: str
    hf_model_type: str
    # llama.cpp permutes Q/K rows (rotate-half -> interleaved RoPE) for Llama-family models only.
    permute_qk: bool
    hf_defaults: dict[str, Any] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=lambda: GGUF_TO_HF_NAMES)
    # HF config key <- GGUF metadata key suffix, beyond GGUF_CONFIG_KEYS.
    config_keys: dict[str, str] = field(default_factory=dict)
    # Subtracted from every `*norm.weight` (llama.cpp stores Gemma's 1 + w).
    norm_offset: float = 0.0


GGUF_ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("LlamaForCausalLM", "llama", permute_qk=True, hf_defaults={"hidden_act": "silu"}),
    "qwen2": GGUFArch(
        "Qwen2ForCausalLM", "qwen2", permute_qk=False, hf_defaults={"hidden_act": "silu", "attention_bias": True}
    ),
    # llama.cpp does not store what it hard-codes for gemma3: every 6th layer global, local RoPE base 10000, no
    # logit soft-cap, queries scaled by head_dim**-0.5 (query_pre_attn_scalar = head_dim; all sizes but 27B).
    "gemma3": GGUFArch(
        "Gemma3ForCausalLM", "gemma3_text", permute_qk=False,
        hf_defaults={"hidden_activation": "gelu_pytorch_tanh", "sliding_window_pattern": 6,
                     "rope_local_base_freq": 10000.0, "final_logit_softcapping": None},
        names=GEMMA3_GGUF_NAMES,
        config_keys={"query_pre_attn_scalar": "attention.key_length", "sliding_window": "attention.sliding_window"},
        norm_offset=1.0,
    ),
}

# HF config key <- GGUF metadata key suffix (after "<arch>.").
GGUF_CONFIG_KEYS: dict[str, str] = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "max_position_embeddings": "context_length",
    "head_dim": "attention.key_length",
}

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_name_to_hf(name: str, names: dict[str, str] = GGUF_TO_HF_NAMES) -> str | None:
    m = _BLOCK.match(name)
    if m:
        return names.get(f"blk.{{layer}}.{m.group(2)}", "").format(layer=m.group(1)) or None
    return names.get(name)


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row permutation: rows (h, i, 2) back to (h, 2, i), i.e. interleaved -> halves."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantizable(qtype) -> bool:
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits  # gguf-py's table of the types it dequantizes (F32/F16 are views)

    return qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or qtype in _type_traits


def _supported_types() -> list[str]:
    from gguf import GGMLQuantizationType

    return [t.name for t in GGMLQuantizationType if _dequantizable(t)]


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: what gguf-py's reader presents (`data` a view of the file mapping, quantized types as
    rows of bytes), built from the raw header."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order, innermost first
    data: np.ndarray


def _tensor_view(mapping: np.ndarray, header: GGUFHeader, info: GGUFTensorInfo) -> GGUFTensor:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    qtype = GGMLQuantizationType(info.ggml_type)  # ValueError for a type gguf-py does not know
    block, type_size = GGML_QUANT_SIZES[qtype]
    n_elements = int(np.prod(info.dims, dtype=np.int64)) if info.dims else 1
    start, n_bytes = header.data_offset + info.offset, n_elements * type_size // block
    if start + n_bytes > mapping.size:
        raise GGUFHeaderError(f"tensor {info.name} ends at byte {start + n_bytes}, past the end of the file "
                              f"({mapping.size} bytes)")
    raw, np_shape = mapping[start:start + n_bytes], tuple(reversed(info.dims))
    plain = _PLAIN_TYPES.get(qtype.name)
    if plain is not None:
        data = raw.view(np.dtype(plain).newbyteorder(header.byte_order)).reshape(np_shape)
    else:
        data = raw.reshape(quant_shape_to_byte_shape(np_shape, qtype))
    return GGUFTensor(info.name, qtype, info.dims, data)


def _blocks(raw: np.ndarray, type_size: int) -> torch.Tensor:
    """The tensor's blocks as rows of bytes, copied out of the read-only file mapping (the quantized bytes are a
    fraction of the float32 result)."""
    return torch.from_numpy(np.array(raw, dtype=np.uint8).reshape(-1, type_size))


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """A block's 4-bit values: the low nibbles of its bytes first, then the high ones (ggml's order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _q4_0(raw: np.ndarray) -> torch.Tensor:  # d (f16), 16 bytes: w = d * (q - 8)
    b = _blocks(raw, 18)
    return (_nibbles(b[:, 2:]).to(torch.int8) - 8).float().mul_(_f16(b, 0))


def _q4_1(raw: np.ndarray) -> torch.Tensor:  # d, m (f16), 16 bytes: w = d * q + m
    b = _blocks(raw, 20)
    return (_f16(b, 0) * _nibbles(b[:, 4:]).float()).add_(_f16(b, 2))


def _q8_0(raw: np.ndarray) -> torch.Tensor:  # d (f16), 32 int8: w = q * d
    b = _blocks(raw, 34)
    return b[:, 2:].contiguous().view(torch.int8).float().mul_(_f16(b, 0))


# The common llama.cpp types dequantized in torch over the whole tensor at once: the same float32 operations, in the
# same order, as gguf-py's numpy code (bit for bit), about 3x faster than its 16-row groups. Other types use gguf-py.
TORCH_DEQUANTIZERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0}


def dequantize_tensor(t: GGUFTensor) -> torch.Tensor:
    """float32 values of one GGUF tensor, flat or in the file's (numpy) shape."""
    fast = TORCH_DEQUANTIZERS.get(t.tensor_type.name)
    if fast is not None:
        return fast(t.data)
    from gguf.quants import dequantize

    data = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    if not data.flags.writeable:  # unquantized types come back as views of the read-only file mapping
        data = data.copy()
    return torch.from_numpy(data)


# Unquantized GGML types and their numpy element types (the rest are presented as bytes, as gguf-py does).
_PLAIN_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                "I32": np.int32, "I64": np.int64}


@register_source("gguf")
class GGUFSource(SourceModel):
    def __init__(self, path: Path):
        if not path.is_file():
            raise PipelineError(f"model.path: GGUF file {path} does not exist")
        self.path = path
        self._gguf_py_reader = None  # gguf-py's parse of this file, shared by transformers' loads (_gguf_py_shared)
        self._tokenizer = None  # built once per opened source (see tokenizer)
        # The header is read with struct (gguf_header), not gguf-py's reader, which builds a numpy view of every
        # vocabulary entry first (seconds for a 49k-token tokenizer); tensors are views of one file mapping.
        try:
            self._header = read_gguf_header(path)
            mapping = np.memmap(path, mode="r")
            tensors = [_tensor_view(mapping, self._header, info) for info in self._header.tensors]
        except (GGUFHeaderError, ValueError, OSError) as e:
            raise PipelineError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None
        arch_name = self._field("general.architecture")
        if arch_name not in GGUF_ARCHS:
            raise PipelineError(
                f"{path}: GGUF architecture {arch_name!r} is not supported; supported: {sorted(GGUF_ARCHS)}"
            )
        self._arch = GGUF_ARCHS[arch_name]
        self._prefix = arch_name
        self._tensors = {}
        for t in tensors:
            if not _dequantizable(t.tensor_type):
                raise PipelineError(f"{path}: GGUF tensor {t.name} has quantization type {t.tensor_type.name}, which "
                                    f"cannot be dequantized; supported: {', '.join(_supported_types())}")
            hf_name = gguf_name_to_hf(t.name, self._arch.names)
            if hf_name is None:
                raise PipelineError(f"{path}: GGUF tensor {t.name} has no HF equivalent this converter knows")
            self._tensors[hf_name] = t
        self.hf_config = self._hf_config()
        self._has_tokenizer = self._field("tokenizer.ggml.model") is not None
        self._data_offset = self._header.data_offset

    def _field(self, key: str, default: Any = None) -> Any:
        """A metadata scalar or string (arrays, such as the vocabulary, are not decoded by the header reader)."""
        return self._header.metadata.get(key, default)

    def _hf_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "architectures": [self._arch.hf_architecture],
            "model_type": self._arch.hf_model_type,
            **self._arch.hf_defaults,
        }
        for hf_key, suffix in {**GGUF_CONFIG_KEYS, **self._arch.config_keys}.items():
            value = self._field(f"{self._prefix}.{suffix}")
            if value is not None:
                cfg[hf_key] = value
        for required in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
            if required not in cfg:
                raise PipelineError(f"{self.path}: GGUF metadata lacks {self._prefix}.{GGUF_CONFIG_KEYS[required]}")
        cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
        embed = self._tensors.get("model.embed_tokens.weight")
        if embed is None:
            raise PipelineError(f"{self.path}: GGUF file has no token_embd.weight")
        cfg["vocab_size"] = int(self.shape("model.embed_tokens.weight")[0])
        cfg["tie_word_embeddings"] = "lm_head.weight" not in self._tensors
        scaling = self._field(f"{self._prefix}.rope.scaling.type")
        if scaling not in (None, "none"):
            cfg["rope_scaling"] = {
                "rope_type": scaling,
                "factor": self._field(f"{self._prefix}.rope.scaling.factor", 1.0),
                "original_max_position_embeddings": self._field(f"{self._prefix}.rope.scaling.original_context_length"),
            }
        for key, gguf_key in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
            value = self._field(gguf_key)
            if value is not None:
                cfg[key] = value
        return cfg

    def names(self) -> set[str]:
        return set(self._tensors)

    def where(self, name: str) -> str:
        return f"{self.path} (GGUF tensor {self._tensors[name].name})"

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions innermost first; torch order is the reverse.
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def read(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        try:
            w = dequantize_tensor(t).reshape(self.shape(name))
        except Exception as e:
            raise PipelineError(f"cannot dequantize {self.where(name)} ({t.tensor_type.name}): {e}") from None
        if self._arch.norm_offset and name.endswith("norm.weight"):
            w = w - self._arch.norm_offset
        if self._arch.permute_qk:
            if name.endswith("self_attn.q_proj.weight"):
                w = unpermute_rows(w, self.hf_config["num_attention_heads"])
            elif name.endswith("self_attn.k_proj.weight"):
                w = unpermute_rows(w, self.hf_config["num_key_value_heads"])
        return w

    def fingerprint(self) -> dict[str, Any]:
        # The header (metadata and tensor table) plus size and mtime; see pipeline.convert.sources.files.
        return {"format": "gguf", "files": [fingerprint_prefix(self.path, self._data_offset)]}

    def has_tokenizer(self) -> bool:
        return self._has_tokenizer

    def tokenizer(self):
        """transformers' tokenizer from the file's vocabulary, built once per opened source (~3 s for a 49k-token
        vocabulary; a run's calibrate, convert and reference stages each ask, and only read it)."""
        from transformers import AutoTokenizer

        if self._tokenizer is None:
            with self._gguf_py_shared(), self._tokenizer_config_from_header():
                self._tokenizer = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        return self._tokenizer

    @contextlib.contextmanager
    def _tokenizer_config_from_header(self):
        """AutoTokenizer parses the whole file through gguf-py (~5 s for a 49k-token vocabulary) only to learn the
        model type and name that pick the tokenizer class; the class then reads the vocabulary with transformers'
        own fast metadata reader (`integrations.gguf.get_gguf_tokenizer`). Within this block that config-only parse
        of this file is answered from the struct header: the model type transformers derives for our architectures
        (gemma3 -> gemma3_text, as ours) and `general.name`. Transformers without that reader take the whole parse
        from the same call, and a file named like Mistral (transformers renames its architecture), keep it too."""
        try:
            import transformers.modeling_gguf_pytorch_utils as loader
            from transformers.integrations.gguf import get_gguf_tokenizer  # noqa: F401  (the fast vocabulary reader)
        except ImportError:
            yield
            return
        name = self._field("general.name")
        if isinstance(name, str) and "mistral" in name.lower():
            yield
            return
        original = loader.load_gguf_checkpoint
        config = {"model_type": self._arch.hf_model_type, **({"_model_name_or_path": name} if name else {})}

        def config_only(path, return_tensors=False, *args, **kwargs):
            if return_tensors or args or kwargs or Path(path).resolve() != self.path.resolve():
                return original(path, return_tensors, *args, **kwargs)
            return {"config": dict(config)}

        loader.load_gguf_checkpoint = config_only
        try:
            yield
        finally:
            loader.load_gguf_checkpoint = original

    def transformers_model(self, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        with self._gguf_py_shared():
            return AutoModelForCausalLM.from_pretrained(self.path.parent, gguf_file=self.path.name, dtype=dtype).eval()

    @contextlib.contextmanager
    def _gguf_py_shared(self):
        """transformers reads a GGUF file through gguf-py: two full parses for the model (config, then weights; ~5 s
        each for a 49k-token vocabulary, whose every entry becomes a numpy view) and one for the tokenizer where
        `_tokenizer_config_from_header` cannot answer it, and gguf-py's tensor-name table rebuilt for every
        submodule (~400 times, ~28 ms each). Within this block this file's reader is parsed once per source and the
        name table built once per (architecture, blocks): both are only read, so transformers builds the same
        tokenizer and model (the reference stays independent of this package's own GGUF reader), in about half the
        time."""
        import gguf

        original_reader, original_names = gguf.GGUFReader, gguf.get_tensor_name_map

        def reader(path, mode="r"):
            if mode != "r" or Path(path).resolve() != self.path.resolve():
                return original_reader(path, mode)
            if self._gguf_py_reader is None:
                self._gguf_py_reader = original_reader(path, mode)
            return self._gguf_py_reader

        gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(original_names)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_names

    def close(self) -> None:
        self._tensors = {}
        self._gguf_py_reader = None
        self._tokenizer = None
