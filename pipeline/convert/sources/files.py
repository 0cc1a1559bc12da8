"""Fingerprints of source files: cheap to compute, yet they change when the content does.

A fingerprint records name, size and mtime_ns of each file plus a sha256 over the part that describes its content:
the whole file for small JSON files, the header (names, dtypes, shapes, offsets) for safetensors and GGUF, and the
zip central directory (which carries a CRC32 of every member) for torch `.bin` files. Hashing whole multi-GB weight
files on every run would cost more than most stages; a change that keeps size, mtime and every header intact is not
a realistic edit.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

_ZIP_TAIL = 1 << 20


def _sha256_range(path: Path, start: int, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        remaining = length
        while remaining > 0:
            block = f.read(min(remaining, 1 << 20))
            if not block:
                break
            h.update(block)
            remaining -= len(block)
    return h.hexdigest()


def _stat(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint_whole(path: Path) -> dict[str, Any]:
    return {**_stat(path), "sha256": _sha256_range(path, 0, path.stat().st_size)}


def fingerprint_safetensors(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        head = f.read(8)
    header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    return {**_stat(path), "sha256_header": _sha256_range(path, 0, 8 + header_len)}


def fingerprint_zip(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    start = max(0, size - _ZIP_TAIL)
    return {**_stat(path), "sha256_tail": _sha256_range(path, start, size - start)}


def fingerprint_prefix(path: Path, length: int) -> dict[str, Any]:
    return {**_stat(path), "sha256_header": _sha256_range(path, 0, length)}


def file_sha256(path: Path) -> str:
    return _sha256_range(path, 0, os.path.getsize(path))
