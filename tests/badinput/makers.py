"""How to make each bad input: small functions over a copy of a tiny model (or a tiny GGUF), named for the damage.

A maker takes the case's work directory (the tiny HF model is already copied to `work/model` when the row asks for
it) and the shared `Fixtures`, and changes or creates files there. Makers are reused across rows and meant to be
reused by the rows of sources added later.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

Maker = Callable[[Path, Any], None]
WEIGHTS = "model.safetensors"


# -- safetensors --------------------------------------------------------------------------------------------------
def _weights(work: Path) -> dict[str, torch.Tensor]:
    return load_file(work / "model" / WEIGHTS)


def _save(work: Path, weights: dict[str, torch.Tensor], name: str = WEIGHTS) -> None:
    save_file(weights, work / "model" / name, metadata={"format": "pt"})


def nothing(work: Path, fx: Any) -> None:
    """The pristine tiny model: the row's overrides alone make the input bad."""


def truncate(fraction: float) -> Maker:
    def make(work: Path, fx: Any) -> None:
        f = work / "model" / WEIGHTS
        with open(f, "r+b") as fh:
            fh.truncate(int(f.stat().st_size * fraction))
    return make


def replace_bytes(data: bytes) -> Maker:
    def make(work: Path, fx: Any) -> None:
        (work / "model" / WEIGHTS).write_bytes(data)
    return make


def garbage(work: Path, fx: Any) -> None:
    (work / "model" / WEIGHTS).write_bytes(random.Random(0).randbytes(4096))


def _rewrite_header(work: Path, edit: Callable[[dict], None], keep_length: bool = True) -> None:
    f = work / "model" / WEIGHTS
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    if keep_length:
        text = text.ljust(n)[:n] if len(text) <= n else text
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def header_offsets_past_end(work: Path, fx: Any) -> None:
    """The last tensor's data_offsets claim more bytes than the file has."""
    def edit(h: dict) -> None:
        name = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        start, end = h[name]["data_offsets"]
        h[name]["data_offsets"] = [start, end + 4096]
    _rewrite_header(work, edit)


def header_overlapping_offsets(work: Path, fx: Any) -> None:
    """Two tensors claim the same bytes (and the offsets no longer cover the buffer)."""
    def edit(h: dict) -> None:
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        h[names[1]]["data_offsets"] = list(h[names[0]]["data_offsets"])
    _rewrite_header(work, edit)


def header_length_past_end(work: Path, fx: Any) -> None:
    f = work / "model" / WEIGHTS
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(raw) * 4) + raw[8:])


def header_not_json(work: Path, fx: Any) -> None:
    f = work / "model" / WEIGHTS
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    f.write_bytes(raw[:8] + b"{" * n + raw[8 + n :])


def drop_tensor(name: str) -> Maker:
    def make(work: Path, fx: Any) -> None:
        w = _weights(work)
        del w[name]
        _save(work, w)
    return make


def edit_tensor(name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Maker:
    def make(work: Path, fx: Any) -> None:
        w = _weights(work)
        w[name] = change(w[name]).contiguous()
        _save(work, w)
    return make


def add_tensor(name: str) -> Maker:
    def make(work: Path, fx: Any) -> None:
        w = _weights(work)
        w[name] = w["model.norm.weight"].clone()
        _save(work, w)
    return make


def with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[[3, 17]] = float("nan")
    return t


def with_inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[5] = float("inf")
    return t


def _split_shards(work: Path, second: set[str], duplicate: str | None) -> dict[str, str]:
    """model.safetensors -> two shards (names in `second` go to the second; `duplicate` is in both)."""
    w = _weights(work)
    (work / "model" / WEIGHTS).unlink()
    one = {k: v for k, v in w.items() if k not in second}
    two = {k: v for k, v in w.items() if k in second}
    if duplicate:
        one[duplicate], two[duplicate] = w[duplicate], w[duplicate].clone()
    _save(work, one, "model-00001-of-00002.safetensors")
    _save(work, two, "model-00002-of-00002.safetensors")
    return {**{k: "model-00001-of-00002.safetensors" for k in one}, **{k: "model-00002-of-00002.safetensors" for k in two}}


def _write_index(work: Path, weight_map: dict[str, str]) -> None:
    (work / "model" / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


LAYER2 = {f"model.layers.2.{p}" for p in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                          "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                                          "input_layernorm.weight", "post_attention_layernorm.weight")}


def index_names_missing_shard(work: Path, fx: Any) -> None:
    weight_map = _split_shards(work, LAYER2, None)
    (work / "model" / "model-00002-of-00002.safetensors").unlink()
    _write_index(work, weight_map)


def index_tensor_in_two_shards(work: Path, fx: Any) -> None:
    _write_index(work, _split_shards(work, LAYER2, "model.norm.weight"))


def index_lists_absent_tensor(work: Path, fx: Any) -> None:
    weight_map = _split_shards(work, LAYER2, None)
    weight_map["model.layers.2.mlp.extra.weight"] = "model-00002-of-00002.safetensors"
    _write_index(work, weight_map)


def index_without_weight_map(work: Path, fx: Any) -> None:
    _split_shards(work, LAYER2, None)
    (work / "model" / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))


def duplicate_tensor_without_index(work: Path, fx: Any) -> None:
    _split_shards(work, LAYER2, "model.layers.0.mlp.up_proj.weight")


def no_weights(work: Path, fx: Any) -> None:
    (work / "model" / WEIGHTS).unlink()


# -- config.json --------------------------------------------------------------------------------------------------
def edit_config(change: Callable[[dict], None]) -> Maker:
    def make(work: Path, fx: Any) -> None:
        path = work / "model" / "config.json"
        cfg = json.loads(path.read_text())
        change(cfg)
        path.write_text(json.dumps(cfg))
    return make


def set_config(**values: Any) -> Maker:
    return edit_config(lambda cfg: cfg.update(values))


def drop_config(*keys: str) -> Maker:
    return edit_config(lambda cfg: [cfg.pop(k) for k in keys])


def config_text(text: str) -> Maker:
    def make(work: Path, fx: Any) -> None:
        (work / "model" / "config.json").write_text(text)
    return make


def remove(name: str) -> Maker:
    def make(work: Path, fx: Any) -> None:
        (work / "model" / name).unlink()
    return make


# -- other tiny models --------------------------------------------------------------------------------------------
def tiny(name: str, **overrides: Any) -> Maker:
    """Another tiny architecture (built once per session) as work/model."""
    def make(work: Path, fx: Any) -> None:
        shutil.rmtree(work / "model", ignore_errors=True)
        shutil.copytree(fx.tiny(name, **overrides), work / "model")
    return make


# An AutoGPTQ config.json section (the source is checked against it before any tensor is read).
GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": False,
               "checkpoint_format": "gptq"}


# -- pytorch .bin -------------------------------------------------------------------------------------------------
class Payload:
    """An object whose unpickling would run a command: the reason `.bin` files are loaded with weights_only."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def bin_with_forbidden_global(work: Path, fx: Any) -> None:
    w = _weights(work)
    (work / "model" / WEIGHTS).unlink()
    torch.save({**w, "extra": Payload()}, work / "model" / "pytorch_model.bin")


def bin_garbage(work: Path, fx: Any) -> None:
    (work / "model" / WEIGHTS).unlink()
    (work / "model" / "pytorch_model.bin").write_bytes(random.Random(1).randbytes(2048))


# -- GGUF ---------------------------------------------------------------------------------------------------------
def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Any]], arch: str = "llama", **meta: int) -> None:
    """A small GGUF file: llama metadata (overridable) and the given tensors (array, raw quantization type or None)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    fields = {"block_count": 1, "embedding_length": 64, "feed_forward_length": 96, "head_count": 8,
              "head_count_kv": 2, "context_length": 128, **meta}
    writer.add_block_count(fields["block_count"])
    writer.add_embedding_length(fields["embedding_length"])
    writer.add_feed_forward_length(fields["feed_forward_length"])
    writer.add_head_count(fields["head_count"])
    writer.add_head_count_kv(fields["head_count_kv"])
    writer.add_context_length(fields["context_length"])
    for name, (array, raw_type) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _float_gguf(path: Path) -> None:
    rng = np.random.default_rng(0)
    write_gguf(path, {"token_embd.weight": (rng.standard_normal((103, 64), dtype=np.float32), None),
                      "output_norm.weight": (np.ones(64, dtype=np.float32), None)})


def gguf_bad_magic(work: Path, fx: Any) -> None:
    _float_gguf(work / "m.gguf")
    raw = (work / "m.gguf").read_bytes()
    (work / "m.gguf").write_bytes(b"GGUX" + raw[4:])


def gguf_truncated_tensor_table(work: Path, fx: Any) -> None:
    """Cut inside the tensor info table (after the metadata, before the data)."""
    import gguf

    _float_gguf(work / "m.gguf")
    reader = gguf.GGUFReader(str(work / "m.gguf"))
    last_field = max(f.offset + sum(p.nbytes for p in f.parts) for f in reader.fields.values())
    raw = (work / "m.gguf").read_bytes()
    (work / "m.gguf").write_bytes(raw[: last_field + 20])


def gguf_unsupported_type(work: Path, fx: Any) -> None:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K]
    raw = np.zeros((103, 256 // block * size), dtype=np.uint8)
    write_gguf(work / "m.gguf", {"token_embd.weight": (raw, gguf.GGMLQuantizationType.Q8_K),
                                 "output_norm.weight": (np.ones(64, dtype=np.float32), None)}, embedding_length=256)


def gguf_unknown_architecture(work: Path, fx: Any) -> None:
    rng = np.random.default_rng(0)
    write_gguf(work / "m.gguf", {"token_embd.weight": (rng.standard_normal((103, 64), dtype=np.float32), None)},
               arch="mamba")


def gguf_lacks_metadata(work: Path, fx: Any) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(work / "m.gguf"), "llama")
    writer.add_embedding_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((103, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# -- datasets -----------------------------------------------------------------------------------------------------
def dataset_file(name: str, text: str) -> Maker:
    def make(work: Path, fx: Any) -> None:
        (work / name).write_text(text)
    return make


# -- engines ------------------------------------------------------------------------------------------------------
def engine_copy(change: Callable[[Path], None]) -> Maker:
    """A copy of the tiny model's cpu engine as work/engine, then changed."""
    def make(work: Path, fx: Any) -> None:
        shutil.copytree(fx.engine(), work / "engine")
        change(work / "engine")
    return make


def engine_config_edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(engine: Path) -> None:
        cfg = json.loads((engine / "config.json").read_text())
        change(cfg)
        (engine / "config.json").write_text(json.dumps(cfg))
    return edit


# -- sources of other producers (NeMo, Megatron-LM, DeepSpeed, JAX, TensorRT-LLM checkpoints, ModelOpt) -------------
# Each is written from the tiny Llama (or GPT-2, Gemma) with the test suite's own writers (tests/convert), then
# damaged. The source is the case's `work/src` (or an archive in `work`).
class Evil:
    """A pickled call of os.system: what a hostile checkpoint would carry."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def _megatron_models(fx: Any) -> dict[str, Path]:
    return {"llama_gqa_untied": fx.llama, "gpt2": fx.tiny("gpt2")}


def _nemo_parts(fx: Any):
    from tests.convert import megatron_samples as ms
    from tests.convert.test_nemo import megatron_dict

    hf_cfg, glob = megatron_dict("llama", _megatron_models(fx))
    return ms, hf_cfg, ms.shard(glob, 1, 1, gated=True), ms.nemo_config("llama", hf_cfg, 1, 1)


def nemo_archive(member: str, kind: str = "file") -> Maker:
    """work/m.nemo: a valid archive plus one hostile member (a file escaping the target, or a link)."""
    def make(work: Path, fx: Any) -> None:
        import io
        import tarfile

        ms, _, shards, config = _nemo_parts(fx)
        path = ms.write_nemo(work / "m.nemo", shards, config)
        info = tarfile.TarInfo(member)
        data = b"x" if kind == "file" else b""
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        info.size = len(data)
        with tarfile.open(path, "a:") as tar:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return make


def nemo_directory(change: Callable[[Path], None]) -> Maker:
    """work/src: an extracted .nemo (model_config.yaml + model_weights.ckpt), then changed."""
    def make(work: Path, fx: Any) -> None:
        import yaml

        ms, _, shards, config = _nemo_parts(fx)
        src = work / "src"
        src.mkdir()
        (src / "model_config.yaml").write_text(yaml.safe_dump(config))
        torch.save(ms.with_prefix(shards[(0, 0)], "model.language_model."), src / "model_weights.ckpt")
        change(src)
    return make


def add_pickled_payload(name: str) -> Callable[[Path], None]:
    def change(src: Path) -> None:
        state = torch.load(src / name, weights_only=False)
        state["evil"] = Evil()
        torch.save(state, src / name)
    return change


def write_text(name: str, text: str) -> Callable[[Path], None]:
    def change(src: Path) -> None:
        (src / name).write_text(text)
    return change


def delete(name: str) -> Callable[[Path], None]:
    def change(src: Path) -> None:
        (src / name).unlink()
    return change


def megatron_checkpoint(change: Callable[[Path], None]) -> Maker:
    """work/src: a Megatron-LM checkpoint (latest_checkpointed_iteration.txt, iter_0000200/mp_rank_00/...)."""
    def make(work: Path, fx: Any) -> None:
        from tests.convert.test_megatron_sources import megatron_lm_dir

        root = megatron_lm_dir(work, _megatron_models(fx), "llama", 1, 1)
        root.rename(work / "src")
        change(work / "src")
    return make


def megatron_args_payload(src: Path) -> None:
    f = src / "iter_0000200" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(f, weights_only=False)
    state["args"].hook = Evil()
    torch.save(state, f)


def megatron_without_args(src: Path) -> None:
    f = src / "iter_0000200" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(f, weights_only=False)
    del state["args"]
    torch.save(state, f)


def deepspeed_checkpoint(change: Callable[[Path], None]) -> Maker:
    """work/src: a DeepSpeed checkpoint (latest, global_step7/mp_rank_00_model_states.pt)."""
    def make(work: Path, fx: Any) -> None:
        from tests.convert.test_megatron_sources import deepspeed_dir

        deepspeed_dir(work, _megatron_models(fx), "llama", 1, False).rename(work / "src")
        change(work / "src")
    return make


def nemo2_checkpoint(change: Callable[[Path], None]) -> Maker:
    """work/src: a NeMo 2 checkpoint (context/ + a torch_dist distributed checkpoint in weights/)."""
    def make(work: Path, fx: Any) -> None:
        from tests.convert.test_megatron_sources import nemo2_dir

        nemo2_dir(work, _megatron_models(fx)).rename(work / "src")
        change(work / "src")
    return make


def pickled_metadata_payload(src: Path) -> None:
    import pickle

    (src / "weights" / ".metadata").write_bytes(pickle.dumps(Evil()))


def truncate_largest_chunk(src: Path) -> None:
    """Cut the largest data file of a distributed checkpoint in half."""
    f = max((p for p in (src / "weights").rglob("*") if p.is_file() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_size)
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


def orbax_checkpoint(change: Callable[[Path], None]) -> Maker:
    """work/src: Kaggle's JAX layout (config.json beside an Orbax checkpoint in tiny-it/) of a tiny Gemma."""
    def make(work: Path, fx: Any) -> None:
        from tests.convert.test_jax_source import jax_tree, save_orbax

        gemma = fx.tiny("gemma")
        (work / "src").mkdir()
        save_orbax(jax_tree(gemma), work / "src" / "tiny-it")
        shutil.copy(gemma / "config.json", work / "src" / "config.json")
        change(work / "src" / "tiny-it")
    return make


def truncate_orbax_array(ckpt: Path) -> None:
    """Cut the largest data file of the Orbax checkpoint (an OCDBT data file or a zarr chunk) in half."""
    f = max((p for p in ckpt.rglob("*") if p.is_file() and "METADATA" not in p.name and p.suffix != ".json"),
            key=lambda p: p.stat().st_size)
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


def trtllm_checkpoint(change: Callable[[Path], None]) -> Maker:
    """work/src: the tiny Llama converted to a tp2 TensorRT-LLM checkpoint, then changed."""
    def make(work: Path, fx: Any) -> None:
        shutil.copytree(fx.checkpoint_tp2(), work / "src")
        change(work / "src")
    return make


def modelopt_export(change: Callable[[Path], None]) -> Maker:
    """work/src: the tiny Llama presented as a ModelOpt export (hf_quant_config.json), then changed."""
    def make(work: Path, fx: Any) -> None:
        shutil.copytree(fx.llama, work / "src")
        (work / "src" / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt", "version": "0.29.0"},
             "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None}}))
        change(work / "src")
    return make


def edit_json(name: str, drop: tuple[str, ...] = ()) -> Callable[[Path], None]:
    def change(src: Path) -> None:
        data = json.loads((src / name).read_text())
        for key in drop:
            data.pop(key, None)
        (src / name).write_text(json.dumps(data))
    return change
