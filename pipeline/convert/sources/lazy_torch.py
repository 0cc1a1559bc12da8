"""A `torch.save` file read tensor by tensor from a stream (a member of a `.nemo` tar), without loading it whole.

The zip's `data.pkl` is parsed by an unpickler that admits only what a plain state dict is made of (OrderedDict,
`_rebuild_tensor_v2`, `_rebuild_parameter`, typed storage classes) and builds references (record, dtype, offset,
size, stride) instead of tensors; a tensor's bytes are then read from its uncompressed zip record on demand. So
memory follows the tensors asked for, not the file, even though the file cannot be memory-mapped. Anything else in
the pickle makes the caller fall back to `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
from dataclasses import dataclass
from typing import IO, Any

import torch

from pipeline.errors import PipelineError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class NotPlain(Exception):
    """The pickle holds something beyond a plain tensor state dict."""


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


class LazyTensor:
    """A reference to one tensor of a LazyTorchFile; `.shape` without reading, `.load()` reads it."""

    def __init__(self, file: "LazyTorchFile", storage: _Storage, offset: int, size: tuple[int, ...],
                 stride: tuple[int, ...]):
        self.file, self.storage, self.offset, self.shape, self.stride = file, storage, offset, torch.Size(size), stride

    def load(self) -> torch.Tensor:
        return self.file.read(self)


def _rebuild(storage: _Storage, offset: int, size, stride, *_args) -> tuple:
    return ("tensor", storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_args):
    return data


class _RefUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise NotPlain(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise NotPlain(f"persistent id {pid!r:.80}")
        return _Storage(str(pid[2]), pid[1].dtype)


class LazyTorchFile:
    def __init__(self, stream: IO[bytes], where: str):
        self.where = where
        try:
            self.zip = zipfile.ZipFile(stream)
            names = self.zip.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise NotPlain(f"not a torch zip file ({e})") from None
        pkl = [n for n in names if n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise NotPlain("no single data.pkl")
        self.prefix = pkl[0][: -len("data.pkl")]
        try:
            raw = _RefUnpickler(io.BytesIO(self.zip.read(pkl[0]))).load()
        except NotPlain:
            raise
        except Exception as e:
            raise NotPlain(str(e)) from None
        self.state = self._refs(raw)

    def _refs(self, obj: Any) -> Any:
        if isinstance(obj, tuple) and len(obj) == 5 and obj[0] == "tensor":
            return LazyTensor(self, *obj[1:])
        if isinstance(obj, dict):
            return collections.OrderedDict((k, self._refs(v)) for k, v in obj.items())
        return obj

    def read(self, ref: LazyTensor) -> torch.Tensor:
        size = ref.storage.dtype.itemsize
        span = 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) if math.prod(ref.shape) else 0
        try:
            with self.zip.open(f"{self.prefix}data/{ref.storage.key}") as f:
                f.seek(ref.offset * size)
                data = f.read(span * size)
        except (KeyError, zipfile.BadZipFile, OSError, EOFError) as e:
            raise PipelineError(f"{self.where}: cannot read storage {ref.storage.key} (truncated?): {e}") from None
        if len(data) != span * size:
            raise PipelineError(f"{self.where}: storage {ref.storage.key} is truncated")
        flat = torch.frombuffer(bytearray(data), dtype=ref.storage.dtype) if span else \
            torch.empty(0, dtype=ref.storage.dtype)
        return flat.as_strided(ref.shape, ref.stride).clone() if span else flat.reshape(ref.shape)
