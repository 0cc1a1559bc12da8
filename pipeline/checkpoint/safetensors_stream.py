"""Write a safetensors file one tensor at a time.

The `safetensors` library serialises a whole dict at once, which would hold a rank's every tensor in memory. The
format is simple (8-byte little-endian header length, JSON header with dtype/shape/byte offsets, then raw
little-endian data), and every shape is known from the plan before any tensor is read, so the header is written
first and each tensor's bytes are streamed after it. Files are read back with `safetensors.safe_open`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import BinaryIO, Sequence

import torch

SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


class StreamingSafetensorsWriter:
    """Writes the declared tensors, in declaration order, to `path`; `close()` checks that all were written."""

    def __init__(
        self,
        path: Path,
        declared: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self._declared = list(declared)
        self._next = 0
        header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for name, shape, dtype in self._declared:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as the reference writer does
        self._file: BinaryIO = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._declared):
            raise AssertionError(f"{self.path.name}: tensor {name} written after all declared tensors")
        want_name, want_shape, want_dtype = self._declared[self._next]
        got = (name, tuple(tensor.shape), tensor.dtype)
        if got != (want_name, want_shape, want_dtype):
            raise AssertionError(f"{self.path.name}: wrote {got}, the header declares {(want_name, want_shape, want_dtype)}")
        data = tensor.detach().contiguous().reshape(-1)
        if data.numel():
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self._next != len(self._declared):
            missing = [n for n, _, _ in self._declared[self._next :]]
            raise AssertionError(f"{self.path.name}: {len(missing)} declared tensors never written, first {missing[0]}")

    def abort(self) -> None:
        self._file.close()


TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where tensor data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        header = json.loads(f.read(length))
    return header, 8 + length


def iter_tensors(path: Path):
    """Yield (name, tensor) in file order with plain reads into fresh tensors: unlike a memory map, nothing of the
    file stays resident after a tensor is consumed, so a loader that transforms tensors one by one stays small."""
    header, start = read_header(path)
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
    with open(path, "rb", buffering=0) as f:
        for name, entry in entries:
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=TORCH_DTYPES[entry["dtype"]])
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
            f.seek(start + begin)
            if f.readinto(view) != end - begin:
                raise ValueError(f"{path}: tensor {name} is truncated")
            yield name, tensor
