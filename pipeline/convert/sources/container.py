"""A checkpoint container: a directory, or a tar archive (plain or gzip) read in place.

A `.nemo` file is a tar whose members are streamed (`TarFile.extractfile`) into `torch.load` and `yaml.safe_load`:
nothing is extracted to disk. Every member is checked when the archive is opened: a member whose path is absolute or
climbs out with `..`, a symbolic or hard link, or a device or FIFO is an error naming the member, so a hostile archive
is refused before anything is read from it or written anywhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path, PurePosixPath
from typing import IO, Any

from pipeline.convert.sources.files import fingerprint_prefix, fingerprint_zip, _stat
from pipeline.errors import PipelineError


def _normalized(name: str) -> str | None:
    """A member name relative to the archive root ('./a/b' -> 'a/b'); None for the root itself."""
    parts = [p for p in PurePosixPath(name).parts if p not in (".", "")]
    return "/".join(parts) or None


class Container:
    """Regular files by relative POSIX path; opened as seekable binary streams."""

    def __init__(self, path: Path):
        self.path = path
        self.is_archive = path.is_file()
        if self.is_archive:
            self._tar, self._members = _open_tar(path)
        else:
            self._tar = None
            self._members = {f.relative_to(path).as_posix(): f for f in sorted(path.rglob("*"))
                             if f.is_file() and not f.is_symlink()}

    def names(self) -> list[str]:
        return list(self._members)

    def has(self, name: str) -> bool:
        return name in self._members

    def where(self, name: str) -> str:
        return f"{self.path}:{name}" if self.is_archive else str(self.path / name)

    def local_path(self, name: str) -> Path | None:
        """The file on disk (directories only), for memory-mapped loading."""
        return None if self.is_archive else self._members[name]

    def open(self, name: str) -> IO[bytes]:
        if name not in self._members:
            raise PipelineError(f"{self.where(name)} does not exist")
        if not self.is_archive:
            return open(self._members[name], "rb")
        try:
            f = self._tar.extractfile(self._members[name])
        except (tarfile.TarError, EOFError, OSError) as e:
            raise PipelineError(f"{self.where(name)}: cannot read the member (truncated archive?): {e}") from None
        if f is None:
            raise PipelineError(f"{self.where(name)} is not a regular file")
        return f

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as f:
            try:
                data = f.read()
            except (tarfile.TarError, EOFError, OSError) as e:
                raise PipelineError(f"{self.where(name)}: truncated member ({e})") from None
        expected = self._members[name].size if self.is_archive else None
        if expected is not None and len(data) != expected:
            raise PipelineError(f"{self.where(name)}: truncated member ({len(data)} of {expected} bytes)")
        return data

    def fingerprint(self, content: tuple[str, ...] = ()) -> dict[str, Any]:
        """Archives: the file's stat and a sha256 over the member table (name, size, mtime, header checksum) plus
        the `content` members in full (small config files). Directories: each file's stat, the zip tail of torch
        files, and `content` files in full."""
        if self.is_archive:
            h = hashlib.sha256()
            for name, m in self._members.items():
                h.update(json.dumps([name, m.size, m.mtime, m.chksum]).encode())
            for name in content:
                if name in self._members:
                    h.update(self.read_bytes(name))
            return {"format": "tar", "files": [{**_stat(self.path), "sha256_members": h.hexdigest()}]}
        files = []
        for name, f in self._members.items():
            if name in content:
                files.append({**fingerprint_prefix(f, f.stat().st_size), "name": name})
            elif f.suffix in (".pt", ".ckpt", ".distcp") or f.name == "model_weights.ckpt":
                files.append({**fingerprint_zip(f), "name": name} if f.suffix != ".distcp"
                             else {**_stat(f), "name": name})
            else:
                files.append({**_stat(f), "name": name})
        return {"format": "directory", "files": files}

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def _open_tar(path: Path) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
    try:
        tar = tarfile.open(path, "r:*")
        members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise PipelineError(f"{path} is not a readable tar archive (plain or gzip; truncated?): {e}") from None
    if not members:
        raise PipelineError(f"{path} is an empty archive")
    files: dict[str, tarfile.TarInfo] = {}
    for m in members:
        name = m.name
        if name.startswith("/") or PurePosixPath(name).is_absolute():
            raise PipelineError(f"{path}: member {name!r} has an absolute path; refusing the archive")
        if ".." in PurePosixPath(name).parts:
            raise PipelineError(f"{path}: member {name!r} escapes the archive with '..'; refusing the archive")
        if m.issym() or m.islnk():
            raise PipelineError(f"{path}: member {name!r} is a {'symbolic' if m.issym() else 'hard'} link "
                                f"(to {m.linkname!r}); refusing the archive")
        if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
            raise PipelineError(f"{path}: member {name!r} is a device or FIFO; refusing the archive")
        if m.isdir():
            continue
        if not m.isfile():
            raise PipelineError(f"{path}: member {name!r} is not a regular file; refusing the archive")
        key = _normalized(name)
        if key is None:
            continue
        if key in files:
            raise PipelineError(f"{path}: member {name!r} appears twice")
        files[key] = m
    last = members[-1]
    if last.isfile() and last.offset_data + last.size > _payload_size(tar, path):
        raise PipelineError(f"{path}: member {last.name!r} is truncated (the archive ends early)")
    return tar, files


def _payload_size(tar: tarfile.TarFile, path: Path) -> int:
    """Bytes of tar stream available: the file size for plain tars; for compressed ones, what decompresses (found by
    reading to the end, which also checks the gzip CRC)."""
    f = tar.fileobj
    if type(f).__name__ not in ("GzipFile", "BZ2File", "LZMAFile"):
        return path.stat().st_size
    try:
        f.seek(0, io.SEEK_END)
        return f.tell()
    except (OSError, EOFError) as e:
        raise PipelineError(f"{path}: the compressed archive is truncated or corrupt ({e})") from None
