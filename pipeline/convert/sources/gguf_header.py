"""The GGUF header read with `struct` alone: metadata scalars, the tensor table and where the tensor data starts.

gguf-py's `GGUFReader` builds a numpy view for every part of every field (a tokenizer's vocabulary and merges are
~150k parts) before it can say where the header ends; fingerprinting a model for the cache key needs only that end.
This reader walks the same layout (GGUF v2/v3, either byte order) without numpy, skipping array payloads, so a run
whose stages are all cached decides so in milliseconds and without importing numpy, torch or gguf-py. `GGUFSource`
reads the tensor data as numpy memory-map views at the offsets this table gives, and uses gguf-py only to
dequantize them.

Layout: magic "GGUF", version u32, tensor count u64, metadata count u64; metadata (key string, value type u32,
value; arrays: item type u32, count u64, items); tensor infos (name string, n_dims u32, dims u64 x n_dims, ggml type
u32, offset u64); padding to `general.alignment` (u32, default 32); tensor data. Strings are a u64 length + bytes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # what gguf-py's reader accepts
DEFAULT_ALIGNMENT = 32

# GGUF value type -> struct format of a scalar (STRING = 8 and ARRAY = 9 are variable-sized).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


class GGUFHeaderError(ValueError):
    """The file is not a GGUF file this reader can walk (gguf-py's reader gives the detailed error)."""


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array, not decoded: its item type and length (a vocabulary holds tens of thousands of strings)."""

    item_type: int
    count: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # innermost first, as GGUF stores them
    ggml_type: int
    offset: int  # from the start of the tensor data


@dataclass
class GGUFHeader:
    version: int
    byte_order: str  # struct prefix, "<" or ">"
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[GGUFTensorInfo] = field(default_factory=list)
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0  # where the tensor data starts: everything before it is the header


class _Cursor:
    def __init__(self, buf, order: str):
        self.buf, self.order, self.pos = buf, order, 0
        self.size = len(buf)

    def take(self, fmt: str) -> Any:
        width = struct.calcsize(fmt)
        if self.pos + width > self.size:
            raise GGUFHeaderError(f"header ends early (offset {self.pos}, file size {self.size})")
        value = struct.unpack_from(self.order + fmt, self.buf, self.pos)[0]
        self.pos += width
        return value

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFHeaderError(f"a length at offset {self.pos} points past the end of the file ({self.size} bytes)")
        self.pos += n

    def string(self) -> str:
        n = self.take("Q")
        start = self.pos
        self.skip(n)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFHeaderError(f"string at offset {start} is not UTF-8 ({e})") from None

    def skip_string(self) -> None:
        self.skip(self.take("Q"))

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.take("I"), self.take("Q")
            self.skip_array(item_type, count)
            return GGUFArray(item_type, count)
        raise GGUFHeaderError(f"unknown metadata value type {vtype} at offset {self.pos}")

    def skip_array(self, item_type: int, count: int) -> None:
        if item_type in _SCALARS:
            self.skip(count * struct.calcsize(_SCALARS[item_type]))
        elif item_type == _STRING:
            take, buf, order, size = struct.unpack_from, self.buf, self.order + "Q", self.size
            pos = self.pos
            for _ in range(count):  # the hot loop of a tokenizer's vocabulary: no method calls per item
                if pos + 8 > size:
                    raise GGUFHeaderError(f"header ends early (offset {pos}, file size {size})")
                pos += 8 + take(order, buf, pos)[0]
            if pos > size:
                raise GGUFHeaderError(f"a string array points past the end of the file ({size} bytes)")
            self.pos = pos
        elif item_type == _ARRAY:
            for _ in range(count):
                self.skip_array(self.take("I"), self.take("Q"))
        else:
            raise GGUFHeaderError(f"unknown array item type {item_type} at offset {self.pos}")


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse the header of a GGUF file; `GGUFHeaderError` when it is not one this reader (or gguf-py's) accepts."""
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise GGUFHeaderError("empty file") from None
    try:
        return _parse(buf)  # struct reads and slices of an mmap copy: no buffer stays exported
    finally:
        buf.close()


def _parse(buf: mmap.mmap) -> GGUFHeader:
    if buf[:4] != GGUF_MAGIC:
        raise GGUFHeaderError("no GGUF magic")
    order = "<"
    cur = _Cursor(buf, order)
    cur.pos = 4
    version = cur.take("I")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
        cur.order = order
    if version not in SUPPORTED_VERSIONS:
        raise GGUFHeaderError(f"GGUF version {version} (supported: {SUPPORTED_VERSIONS})")
    header = GGUFHeader(version, order)
    tensor_count, kv_count = cur.take("Q"), cur.take("Q")
    for _ in range(kv_count):
        key = cur.string()
        vtype = cur.take("I")
        if key in header.metadata:
            raise GGUFHeaderError(f"duplicate metadata key {key!r}")
        header.metadata[key] = cur.value(vtype)
        if key == "general.alignment" and vtype != _UINT32:
            raise GGUFHeaderError("general.alignment is not a uint32")
    names = set()
    for _ in range(tensor_count):
        name = cur.string()
        n_dims = cur.take("I")
        dims = tuple(cur.take("Q") for _ in range(n_dims))
        info = GGUFTensorInfo(name, dims, cur.take("I"), cur.take("Q"))
        if name in names:
            raise GGUFHeaderError(f"duplicate tensor {name!r}")
        names.add(name)
        header.tensors.append(info)
    alignment = header.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFHeaderError(f"general.alignment={alignment} is not a power of two")
    header.alignment = alignment
    header.data_offset = cur.pos + (-cur.pos % alignment)
    return header


def gguf_fingerprint(path: Path) -> dict:
    """`GGUFSource(path).fingerprint()` from the raw header: the sha256 of every byte before the tensor data (magic,
    version, metadata, tensor table, padding) plus name, size and mtime_ns; the same value, without gguf-py."""
    from pipeline.convert.sources.files import fingerprint_prefix

    if not path.is_file():
        raise GGUFHeaderError(f"{path} is not a file")
    return {"format": "gguf", "files": [fingerprint_prefix(path, read_gguf_header(path).data_offset)]}
