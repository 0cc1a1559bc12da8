"""Megatron-core distributed checkpoints (`torch_dist` backend) read without megatron-core and without a process
group.

The directory (`weights/` of NeMo 2, `model_weights/` of an mcore `.nemo`, an `iter_*` directory of Megatron-LM)
holds `metadata.json` (`sharded_backend`), `.metadata` (a pickled `torch.distributed.checkpoint` Metadata: each
tensor's global size, dtype and chunks, and where each chunk lies) and `__R_N.distcp` files in which every chunk is
a separately `torch.save`d tensor at (offset, length). The `.metadata` pickle is read by the restricted unpickler
(only metadata classes), each chunk with `torch.load(weights_only=True)` on its byte range.

Tensors are logical (global) tensors: no source tensor-parallel merging is needed, and a gated fc1 is stored as
[gate; up] of the whole model. mcore stacks the layers of a transformer block on a leading dimension
(`decoder.layers.self_attention.linear_qkv.weight` is [L, rows, hidden]); one layer is read as a byte range of its
chunk (chunks are contiguous rows), so memory follows one layer, not the stacked tensor.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from typing import IO, Any

import torch

from pipeline.convert.sources.container import Container
from pipeline.convert.sources.megatron_weights import normalize_key
from pipeline.convert.sources.safe_load import load_dcp_metadata, load_torch
from pipeline.errors import PipelineError

_STACKED = re.compile(r"^encoder\.layers\.([^\d].*)$")


class _Window(io.RawIOBase):
    """A seekable read-only view of bytes [start, start + length) of a binary stream."""

    def __init__(self, base: IO[bytes], start: int, length: int):
        self.base, self.start, self.length, self.pos = base, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        self.base.seek(self.start + self.pos)
        data = self.base.read(n)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def is_dist_checkpoint(container: Container, prefix: str) -> bool:
    return container.has(f"{prefix}.metadata") or container.has(f"{prefix}metadata.json")


def backend(container: Container, prefix: str) -> str:
    name = f"{prefix}metadata.json"
    if not container.has(name):
        return "torch_dist"
    try:
        meta = json.loads(container.read_bytes(name))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{container.where(name)} is not valid JSON ({e})") from None
    return str(meta.get("sharded_backend", "torch_dist"))


def open_dist_checkpoint(container: Container, prefix: str):
    """The shard of a megatron-core distributed checkpoint, by its `sharded_backend`."""
    kind = backend(container, prefix)
    if kind == "torch_dist":
        return DistCheckpointShard(container, prefix)
    if kind == "zarr":
        return ZarrShard(container, prefix)
    raise PipelineError(f"{container.where(prefix + 'metadata.json')}: sharded_backend {kind!r} is not supported "
                        "(torch_dist and zarr are)")


def _layered(name: str, size: tuple[int, ...]):
    """(per-layer name, layer, shape) entries of a normalised key: stacked layers are split on dim 0."""
    stacked = _STACKED.match(name)
    if stacked:
        return [(f"encoder.layers.{layer}.{stacked.group(1)}", layer, size[1:]) for layer in range(size[0])]
    return [(name, None, size)]


_ZARR_DTYPES = {"bfloat16": torch.bfloat16, "<f4": torch.float32, "<f2": torch.float16, "<f8": torch.float64,
                "|i1": torch.int8, "|u1": torch.uint8, "<i4": torch.int32, "<i8": torch.int64}


class ZarrShard:
    """mcore's `zarr` backend read without zarr: one zarr v2 array per key (`<key>/.zarray` + raw C-order chunk
    files, no compressor; bfloat16 written as 2-byte raw with the dtype string `bfloat16`). A layer of a stacked
    array reads only the chunks that hold it."""

    releasable = True

    def __init__(self, container: Container, prefix: str):
        self.container, self.prefix = container, prefix
        self.where = container.where(prefix.rstrip("/") or ".")
        self._arrays: dict[str, dict[str, Any]] = {}
        self._entries: dict[str, tuple[str, int | None]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for member in container.names():
            if not (member.startswith(prefix) and member.endswith("/.zarray")):
                continue
            key = member[len(prefix):-len("/.zarray")]
            if "/" in key or key.startswith("optimizer"):
                continue
            name = normalize_key(key)
            if name is None:
                continue
            meta = self._zarray(member)
            self._arrays[key] = meta
            for entry, layer, shape in _layered(name, tuple(meta["shape"])):
                if entry in self.shapes:
                    raise PipelineError(f"{self.where}: two arrays name {entry} (second: {key})")
                self._entries[entry] = (key, layer)
                self.shapes[entry] = tuple(shape)
        if not self._arrays:
            raise PipelineError(f"{self.where}: a zarr distributed checkpoint without any <key>/.zarray array")

    def _zarray(self, member: str) -> dict[str, Any]:
        where = self.container.where(member)
        try:
            meta = json.loads(self.container.read_bytes(member))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PipelineError(f"{where} is not valid JSON ({e})") from None
        if meta.get("zarr_format") != 2 or meta.get("order", "C") != "C":
            raise PipelineError(f"{where}: expected a zarr v2 C-order array")
        if meta.get("compressor") is not None or meta.get("filters"):
            raise PipelineError(f"{where}: compressed or filtered zarr arrays are not supported (mcore writes none)")
        if meta.get("dtype") not in _ZARR_DTYPES:
            raise PipelineError(f"{where}: dtype {meta.get('dtype')!r} is not supported")
        return meta

    def get(self, name: str) -> torch.Tensor:
        key, layer = self._entries[name]
        meta = self._arrays[key]
        shape, chunks = tuple(meta["shape"]), tuple(meta["chunks"])
        dtype = _ZARR_DTYPES[meta["dtype"]]
        sep = meta.get("dimension_separator", ".")
        full = torch.full(shape if layer is None else (1, *shape[1:]), float(meta.get("fill_value") or 0),
                          dtype=dtype)
        grid = [range(-(-s // c)) for s, c in zip(shape, chunks)]
        if layer is not None:
            grid[0] = range(layer // chunks[0], layer // chunks[0] + 1)
        import itertools

        for index in itertools.product(*grid):
            member = f"{self.prefix}{key}/{sep.join(map(str, index))}"
            if not self.container.has(member):
                continue  # zarr leaves chunks equal to fill_value unwritten
            data = self.container.read_bytes(member)
            want = math.prod(chunks) * torch.empty((), dtype=dtype).element_size()
            if len(data) != want:
                raise PipelineError(f"{self.container.where(member)}: {len(data)} bytes, expected {want} for chunk "
                                    f"shape {list(chunks)}")
            chunk = torch.frombuffer(bytearray(data), dtype=dtype).reshape(chunks)
            starts = [i * c for i, c in zip(index, chunks)]
            if layer is not None:
                chunk = chunk.narrow(0, layer - starts[0], 1)
                starts[0] = 0
            dest = full
            for dim, start in enumerate(starts):
                n = min(chunk.shape[dim], dest.shape[dim] - start)
                dest, chunk = dest.narrow(dim, start, n), chunk.narrow(dim, 0, n)
            dest.copy_(chunk)
        return full[0] if layer is not None else full

    def release(self) -> None:
        pass


class DistCheckpointShard:
    """A distributed checkpoint as one (tp 0, pp 0) shard of global tensors under normalised per-layer names."""

    releasable = True

    def __init__(self, container: Container, prefix: str):
        self.container, self.prefix = container, prefix
        self.where = container.where(prefix.rstrip("/") or ".")
        meta_name = f"{prefix}.metadata"
        if not container.has(meta_name):
            raise PipelineError(f"{self.where}: .metadata is missing (not a torch_dist checkpoint?)")
        self.meta = load_dcp_metadata(container.read_bytes(meta_name), container.where(meta_name))
        self._entries: dict[str, tuple[str, int | None]] = {}  # name -> (fqn, layer or None)
        self.shapes: dict[str, tuple[int, ...]] = {}
        for fqn, md in self.meta.state_dict_metadata.items():
            if not hasattr(md, "chunks") or fqn.startswith("optimizer"):
                continue  # bytes items (extra state, RNG) and optimizer state
            name = normalize_key(fqn)
            if name is None:
                continue
            for entry, layer, shape in _layered(name, tuple(md.size)):
                self._add(entry, fqn, layer, shape)
        self._files: dict[str, IO[bytes]] = {}

    def _add(self, name: str, fqn: str, layer: int | None, shape: tuple[int, ...]) -> None:
        if name in self.shapes:
            raise PipelineError(f"{self.where}: two entries name {name} (second: {fqn})")
        self._entries[name] = (fqn, layer)
        self.shapes[name] = tuple(shape)

    def get(self, name: str) -> torch.Tensor:
        fqn, layer = self._entries[name]
        md = self.meta.state_dict_metadata[fqn]
        out = torch.empty(self.shapes[name], dtype=md.properties.dtype)
        for chunk in md.chunks:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            if layer is not None and not offsets[0] <= layer < offsets[0] + sizes[0]:
                continue
            piece = self._read_chunk(fqn, offsets, sizes, None if layer is None else layer - offsets[0])
            dest = out
            for dim, (o, s) in enumerate(zip(offsets[1:] if layer is not None else offsets,
                                             sizes[1:] if layer is not None else sizes)):
                dest = dest.narrow(dim, o, s)
            dest.copy_(piece)
        return out

    def _storage(self, fqn: str, offsets: tuple[int, ...]) -> Any:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.meta.storage_data.get(MetadataIndex(fqn, torch.Size(offsets)))
        if info is None:
            raise PipelineError(f"{self.where}: the metadata has no storage entry for {fqn} at {list(offsets)}")
        if getattr(info, "transform_descriptors", None):
            raise PipelineError(f"{self.where}: {fqn} is stored with transforms {info.transform_descriptors} "
                                "(compressed checkpoints are not supported)")
        return info

    def _file(self, relative: str) -> IO[bytes]:
        name = f"{self.prefix}{relative}"
        if name not in self._files:
            if not self.container.has(name):
                raise PipelineError(f"{self.where}: data file {relative} is missing")
            self._files[name] = self.container.open(name)
        return self._files[name]

    def _read_chunk(self, fqn: str, offsets, sizes, row: int | None) -> torch.Tensor:
        """A chunk, or one row (layer) of it: the layer's bytes are read straight from the saved tensor's storage
        record when it is contiguous; otherwise the chunk is loaded whole."""
        info = self._storage(fqn, offsets)
        where = f"{self.container.where(self.prefix + info.relative_path)} ({fqn})"
        window = _Window(self._file(info.relative_path), info.offset, info.length)
        meta = self._meta_tensor(window, where)
        if row is not None and meta.is_contiguous() and tuple(meta.shape) == tuple(sizes):
            record = self._data_record(window, where)
            if record is not None:
                per_row = math.prod(sizes[1:]) * meta.element_size()
                start = (meta.storage_offset() * meta.element_size()) + row * per_row
                with record as f:
                    f.seek(start)
                    data = f.read(per_row)
                if len(data) != per_row:
                    raise PipelineError(f"{where}: truncated data")
                return torch.frombuffer(bytearray(data), dtype=meta.dtype).reshape(sizes[1:])
        window.seek(0)
        tensor = load_torch(window, where)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(sizes):
            raise PipelineError(f"{where}: stored chunk does not match its metadata size {list(sizes)}")
        return tensor if row is None else tensor[row]

    @staticmethod
    def _meta_tensor(window: _Window, where: str) -> torch.Tensor:
        window.seek(0)
        try:
            t = torch.load(window, map_location="meta", weights_only=True)
        except Exception as e:
            raise PipelineError(f"{where}: not a loadable tensor record (truncated or corrupt?): {e}") from None
        if not isinstance(t, torch.Tensor):
            raise PipelineError(f"{where}: the record is a {type(t).__name__}, not a tensor")
        return t

    @staticmethod
    def _data_record(window: _Window, where: str):
        window.seek(0)
        try:
            z = zipfile.ZipFile(window)
        except zipfile.BadZipFile as e:
            raise PipelineError(f"{where}: not a torch zip record ({e})") from None
        data = [i for i in z.infolist() if re.search(r"/data/\d+$", i.filename)]
        if len(data) != 1 or data[0].compress_type != zipfile.ZIP_STORED:
            return None
        return z.open(data[0])

    def release(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
