"""Gemma (1 and 2) checkpoints from JAX: Orbax PyTree checkpoints (OCDBT or per-array zarr, read with `tensorstore`
alone: no jax, flax or orbax import) and Flax msgpack files (`flax.serialization.to_bytes`, read with `msgpack`).

Parameters are named by their path in the tree (`transformer/layer_0/attn/q_einsum/w`), whatever the layout the
writer used (Orbax's FLAT keys `('transformer/layer_0/attn/q_einsum', 'w')` or nested dicts). They are presented as
the HF Gemma names the architecture tables already bind (`JAX_TO_HF`), reshaped from the einsum layouts:
q_einsum [NH, H, D], kv_einsum [2, NKV, H, D] or qkv_einsum [3, NH, H, D] (MHA), attn_vec_einsum [NH, D, H],
gating_einsum [2, H, F] ([0] the GELU branch), linear [F, H]. Norms are stored without the +1 exactly as HF stores
them; Gemma 2's post-attention and post-FFW norms map to its `post_attention_layernorm` / `post_feedforward_layernorm`.

The config comes from an HF-style `config.json` beside the checkpoint when there is one (checked against the
shapes), else it is inferred from the shapes as TensorRT-LLM's Gemma JAX reader does, with the Gemma defaults. The
tokenizer is the `tokenizer.model` beside the checkpoint (or in its parent directory, as Kaggle/HF ship them).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.convert.sources import register_source
from pipeline.convert.sources.base import SourceModel
from pipeline.convert.sources.files import fingerprint_prefix, fingerprint_whole
from pipeline.errors import PipelineError

INSTALL = "pip install 'trtllm-pipeline[jax]' (tensorstore, msgpack)"
_LAYER = re.compile(r"^layer_(\d+)$")


def _to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype.name == "bfloat16":  # ml_dtypes.bfloat16: same bits as torch.bfloat16
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint16).astype(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a.copy() if not a.flags.writeable or not a.flags.c_contiguous else a)


# -- readers: leaf path -> (shape, read function) ---------------------------------------------------------------------
def _orbax_leaves(directory: Path) -> dict[tuple[str, ...], tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    try:
        import tensorstore as ts
    except ImportError:
        raise PipelineError(f"reading Orbax checkpoints needs tensorstore: {INSTALL}") from None
    meta_path = directory / "_METADATA"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"Orbax checkpoint {directory}: cannot read _METADATA ({e})") from None
    tree = meta.get("tree_metadata")
    if not isinstance(tree, dict):
        raise PipelineError(f"{meta_path}: no tree_metadata object")
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    use_ocdbt = meta.get("use_ocdbt", True)
    base = directory.resolve().as_uri() + "/"
    leaves = {}
    for key_text, entry in tree.items():
        try:
            key = tuple(str(k) for k in ast.literal_eval(key_text))
        except (ValueError, SyntaxError):
            raise PipelineError(f"{meta_path}: tree key {key_text!r} is not a key path") from None
        value = (entry or {}).get("value_metadata") or {}
        if value.get("value_type") not in ("jax.Array", "np.ndarray") or value.get("skip_deserialize"):
            continue
        array_key = ".".join(key)
        kvstore = ({"driver": "ocdbt", "base": base, "path": array_key + "/"} if use_ocdbt
                   else {"driver": "file", "path": str(directory / array_key)})
        try:
            store = ts.open({"driver": driver, "kvstore": kvstore}, open=True).result()
        except Exception as e:
            raise PipelineError(f"Orbax checkpoint {directory}: array {array_key} listed in _METADATA cannot be "
                                f"opened (missing or corrupt): {str(e).splitlines()[0]}") from None
        leaves[_components(key)] = (tuple(store.shape), lambda s=store: s.read().result())
    return leaves


def _msgpack_leaves(path: Path) -> dict[tuple[str, ...], tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    try:
        import msgpack
    except ImportError:
        raise PipelineError(f"reading Flax msgpack checkpoints needs msgpack: {INSTALL}") from None
    import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy

    def ext_hook(code: int, data: bytes):
        if code == 1:  # flax: an ndarray as msgpack (shape, dtype name, raw C-order bytes)
            shape, dtype, buffer = msgpack.unpackb(data)
            return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape)
        if code == 3:  # flax: a numpy scalar
            dtype, buffer = msgpack.unpackb(data)
            return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(())
        raise PipelineError(f"{path}: msgpack extension type {code} is not a Flax array")

    try:
        tree = msgpack.unpackb(path.read_bytes(), ext_hook=ext_hook, strict_map_key=False)
    except PipelineError:
        raise
    except Exception as e:
        raise PipelineError(f"{path} is not a Flax msgpack checkpoint: {e}") from None
    leaves = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*prefix, str(k)))
        elif isinstance(node, np.ndarray):
            leaves[_components(prefix)] = (tuple(node.shape), lambda a=node: a)

    walk(tree, ())
    return leaves


def _components(key: tuple[str, ...]) -> tuple[str, ...]:
    """A key path with slash-joined parts split: ('transformer/layer_0/attn/q_einsum', 'w') -> 5 components."""
    return tuple(p for k in key for p in k.split("/") if p)


# -- the JAX -> HF name table ------------------------------------------------------------------------------------------
# JAX path (under transformer/, layer paths under layer_{i}/, without the leaf `w`/`scale`) -> HF names and how to
# derive each from the JAX array (dims from the config).
def _heads_to_rows(w: torch.Tensor) -> torch.Tensor:
    """[heads, H, D] -> (heads * D, H)."""
    return w.permute(0, 2, 1).reshape(w.shape[0] * w.shape[2], w.shape[1])


JAX_LAYER_TO_HF: dict[str, list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]] = {
    "attn/q_einsum": [("self_attn.q_proj.weight", _heads_to_rows)],
    "attn/kv_einsum": [("self_attn.k_proj.weight", lambda w: _heads_to_rows(w[0])),
                       ("self_attn.v_proj.weight", lambda w: _heads_to_rows(w[1]))],
    "attn/qkv_einsum": [("self_attn.q_proj.weight", lambda w: _heads_to_rows(w[0])),
                        ("self_attn.k_proj.weight", lambda w: _heads_to_rows(w[1])),
                        ("self_attn.v_proj.weight", lambda w: _heads_to_rows(w[2]))],
    "attn/attn_vec_einsum": [("self_attn.o_proj.weight", lambda w: w.reshape(-1, w.shape[-1]).t())],
    "mlp/gating_einsum": [("mlp.gate_proj.weight", lambda w: w[0].t()), ("mlp.up_proj.weight", lambda w: w[1].t())],
    "mlp/linear": [("mlp.down_proj.weight", lambda w: w.t())],
    "pre_attention_norm": [("input_layernorm.weight", lambda w: w)],
    "post_attention_norm": [("post_attention_layernorm.weight", lambda w: w)],  # Gemma 2
    "post_ffw_norm": [("post_feedforward_layernorm.weight", lambda w: w)],  # Gemma 2
}
# pre_ffw_norm is Gemma 1's post_attention_layernorm and Gemma 2's pre_feedforward_layernorm.
PRE_FFW = {False: "post_attention_layernorm.weight", True: "pre_feedforward_layernorm.weight"}
LEAVES = ("w", "scale", "input_embedding")


@register_source("jax")
class JaxGemmaSource(SourceModel):
    def __init__(self, path: Path):
        self.path = path
        ckpt = _locate(path)
        self.ckpt = ckpt
        leaves = _msgpack_leaves(ckpt) if ckpt.is_file() else _orbax_leaves(ckpt)
        self._jax = {self._jax_name(k): v for k, v in leaves.items()}
        self._jax.pop(None, None)
        self.gemma2 = any(n.endswith("post_ffw_norm") for n in self._jax)
        self._map: dict[str, tuple[str, Callable]] = {}
        for jname in self._jax:
            for hf_name, fn in self._hf_names(jname):
                self._map[hf_name] = (jname, fn)
        self.hf_config = self._config()
        self._cached: tuple[str, torch.Tensor] | None = None

    def _jax_name(self, key: tuple[str, ...]) -> str | None:
        parts = [p for p in key if p != "params"]
        if parts and parts[0] == "transformer":
            parts = parts[1:]
        if parts and parts[-1] in LEAVES and not (parts[-1] == "input_embedding"):
            parts = parts[:-1]
        if not parts:
            return None
        return "/".join(parts)

    def _hf_names(self, jname: str) -> list[tuple[str, Callable]]:
        if jname in ("embedder/input_embedding", "embedder"):
            return [("model.embed_tokens.weight", lambda w: w)]
        if jname == "final_norm":
            return [("model.norm.weight", lambda w: w)]
        head, _, rest = jname.partition("/")
        m = _LAYER.match(head)
        if m is None:
            raise PipelineError(f"{self.ckpt}: parameter {jname} is not a Gemma parameter this reader knows")
        prefix = f"model.layers.{int(m.group(1))}."
        if rest == "pre_ffw_norm":
            return [(prefix + PRE_FFW[self.gemma2], lambda w: w)]
        if rest not in JAX_LAYER_TO_HF:
            raise PipelineError(f"{self.ckpt}: parameter {jname} is not a Gemma parameter this reader knows "
                                "(Gemma 1 and 2 names are supported)")
        return [(prefix + name, fn) for name, fn in JAX_LAYER_TO_HF[rest]]

    # -- config -----------------------------------------------------------------------------------------------------
    def _shape(self, jname: str) -> tuple[int, ...]:
        if jname not in self._jax:
            raise PipelineError(f"{self.ckpt}: parameter {jname} is missing")
        return self._jax[jname][0]

    def _config(self) -> dict[str, Any]:
        layers = sorted({int(_LAYER.match(n.split("/")[0]).group(1)) for n in self._jax if _LAYER.match(n.split("/")[0])})
        if not layers or layers != list(range(len(layers))):
            raise PipelineError(f"{self.ckpt}: decoder layers must be layer_0..layer_N-1, found {layers[:8]}")
        emb = "embedder/input_embedding" if "embedder/input_embedding" in self._jax else "embedder"
        vocab, hidden = self._shape(emb)
        heads, head_dim, _ = self._shape("layer_0/attn/attn_vec_einsum")
        kv_heads = heads if "layer_0/attn/qkv_einsum" in self._jax else self._shape("layer_0/attn/kv_einsum")[1]
        ffn = self._shape("layer_0/mlp/linear")[0]
        inferred = {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": len(layers),
                    "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
                    "intermediate_size": ffn}
        beside = next((d / "config.json" for d in (self.path if self.path.is_dir() else self.path.parent,
                                                    self.ckpt.parent) if (d / "config.json").is_file()), None)
        if beside is not None:
            try:
                cfg = json.loads(beside.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise PipelineError(f"{beside} is not valid JSON ({e}); fix it or remove it (the model's shape is "
                                    "then read from the checkpoint)") from None
            if not isinstance(cfg, dict):
                raise PipelineError(f"{beside} must hold a JSON object, not {type(cfg).__name__}")
            for key, value in inferred.items():
                if key in cfg and cfg[key] != value:
                    raise PipelineError(f"{beside}: {key}={cfg[key]} but the checkpoint's shapes say {value}")
            return {**cfg, **inferred}
        arch = "Gemma2ForCausalLM" if self.gemma2 else "GemmaForCausalLM"
        defaults = {"architectures": [arch], "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                    "max_position_embeddings": 8192, "hidden_activation": "gelu_pytorch_tanh"}
        if self.gemma2:  # the gemma library's Gemma 2 defaults
            defaults.update(query_pre_attn_scalar=head_dim, attn_logit_softcapping=50.0,
                            final_logit_softcapping=30.0, sliding_window=4096)
        return {**defaults, **inferred}

    # -- SourceModel ------------------------------------------------------------------------------------------------
    def names(self) -> set[str]:
        return set(self._map)

    def shape(self, name: str) -> tuple[int, ...]:
        jname, fn = self._map[name]
        return tuple(fn(torch.empty(self._jax[jname][0], device="meta")).shape)

    def read(self, name: str) -> torch.Tensor:
        jname, fn = self._map[name]
        if self._cached is None or self._cached[0] != jname:  # kv/qkv/gating arrays feed several names: read once
            self._cached = None
            try:
                array = self._jax[jname][1]()
            except Exception as e:
                raise PipelineError(f"{self.ckpt}: cannot read {jname} (truncated or corrupt?): {e}") from None
            self._cached = (jname, _to_torch(array))
        return fn(self._cached[1]).contiguous()

    def where(self, name: str) -> str:
        return f"{self.ckpt} ({self._map[name][0]})" if name in self._map else str(self.ckpt)

    def fingerprint(self) -> dict[str, Any]:
        if self.ckpt.is_file():
            files = [fingerprint_prefix(self.ckpt, min(self.ckpt.stat().st_size, 1 << 20))]
        else:
            files = [fingerprint_whole(self.ckpt / "_METADATA")]
            files += [{"name": str(f.relative_to(self.ckpt)), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
                      for f in sorted(self.ckpt.rglob("*")) if f.is_file()]
        return {"format": "jax", "files": files}

    def tokenizer(self):
        for d in (self.path if self.path.is_dir() else self.path.parent, self.ckpt.parent, self.ckpt.parent.parent):
            if (d / "tokenizer.model").is_file():
                from transformers import GemmaTokenizer

                return GemmaTokenizer(vocab_file=str(d / "tokenizer.model"))
        return None

    def close(self) -> None:
        self._cached = None


def _locate(path: Path) -> Path:
    """The Orbax directory or msgpack file: `path` itself, or the one checkpoint inside it (Kaggle's `2b-it/`)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise PipelineError(f"model.path: {path} does not exist")
    if (path / "_METADATA").is_file():
        return path
    found = [d for d in sorted(path.iterdir()) if d.is_dir() and (d / "_METADATA").is_file()]
    found += [f for f in sorted(path.iterdir()) if f.is_file() and f.suffix in (".msgpack", ".flax")]
    if len(found) != 1:
        raise PipelineError(f"{path}: expected an Orbax checkpoint (a directory with _METADATA) or one Flax "
                            f"*.msgpack file, found {len(found)}")
    return found[0]
