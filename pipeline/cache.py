"""The content-addressed artifact cache: `<root>/<stage>/<key>/`, published atomically, guarded by lock files.

- key = sha256 of the canonical JSON of the stage's identity (see `cache_key`); never a timestamp or a run path.
- A stage writes into a temp directory beside its target; the executor writes `manifest.json` last (fsynced) and
  renames the directory into place, so a reader sees either nothing or a complete artifact.
- A directory without a valid manifest (or whose manifest lists files that are gone or have another size) is a
  miss: it is removed with a warning and recomputed.
- `<root>/<stage>/<key>.lock` is held with `flock` (which Linux maps to a server-side lock on NFS) and
  records the pid, host and command of the process computing that key; a second run waits for it, naming the
  holder, and then reuses the artifact. The kernel (or the NFS server) releases the lock when its process dies, so a
  killed run never blocks the next one; the file it leaves is taken over. Waiting ends with an error after
  `lock_timeout` seconds (a holder on another host that hangs).
- Temp directories are named `.tmp-<key16>-<pid>@<host>-<random>`: one whose process is gone on this host is stale
  and removed; one of another host is left alone.
- Each output file's size and sha256 are in the manifest: `lookup` checks sizes on every hit (cheap), `verify`
  re-hashes everything and evicts what does not match. `entries`, `remove` and `gc` manage disk use.
- A run holds a shared lease (`flock(LOCK_SH)` on `<root>/<stage>/<key>.lease`) on every artifact it uses, from
  before its lookup until the run ends, so `remove` and `gc` (which need the lease exclusively) skip an entry a
  running stage reads, saying so, instead of pulling an engine from under an evaluation.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline import faults
from pipeline.errors import PipelineError
from pipeline.schemas import schema_errors

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
EVICTED_PREFIX = ".evicted-"
LEASE_SUFFIX = ".lease"
HOST = socket.gethostname()
DEFAULT_LOCK_TIMEOUT = 6 * 3600.0


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, NaN/inf refused: the same data always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def cache_key(stage: str, version: int, config: Any, inputs: dict[str, str], external: Any) -> str:
    """sha256 over stage name and version, the resolved config the stage reads, upstream keys, external inputs."""
    identity = {"stage": stage, "version": version, "config": config, "inputs": inputs, "external": external}
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ArtifactCache:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    # -- lookup ----------------------------------------------------------------------------------------------
    def lookup(self, stage: str, key: str) -> dict[str, Any] | None:
        """The manifest of a valid published artifact, or None (an invalid entry is removed)."""
        target = self.path(stage, key)
        if not target.exists():
            return None
        problem = self._check(target, stage, key)
        if problem is None:
            with contextlib.suppress(OSError):  # last use, for `gc --keep-last`
                os.utime(target)
            return json.loads((target / MANIFEST).read_text())
        log.warning("cache entry %s is invalid (%s); removing it and recomputing", target, problem)
        self._evict_dir(target)
        return None

    def is_valid(self, stage: str, key: str) -> bool:
        """Whether `lookup` would return the entry (nothing is removed or touched)."""
        target = self.path(stage, key)
        return target.is_dir() and self._check(target, stage, key) is None

    def _check(self, target: Path, stage: str, key: str) -> str | None:
        try:
            manifest = json.loads((target / MANIFEST).read_text())
        except FileNotFoundError:
            return "no manifest.json"
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return f"unreadable manifest.json: {e}"
        errors = schema_errors(manifest, "manifest")
        if errors:
            return f"manifest.json violates its schema: {errors[0]}"
        if manifest["stage"] != stage or manifest["key"] != key:
            return "manifest names another stage or key"
        for name, entry in manifest["outputs"].items():
            f = target / name
            if not f.is_file() or f.stat().st_size != entry["size"]:
                return f"output {name} is missing or has the wrong size"
        return None

    # -- publish ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def staging(self, stage: str, key: str) -> Iterator[Path]:
        """A fresh temp directory beside the target; removed if the body fails."""
        parent = self.root / stage
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{key[:16]}-{os.getpid()}@{_host_tag()}-", dir=parent))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def publish(self, tmp: Path, stage: str, key: str, manifest: dict[str, Any]) -> Path:
        """Write the manifest last, then rename the temp directory into place."""
        errors = schema_errors(manifest, "manifest")
        if errors:
            raise PipelineError(f"internal error: manifest for {stage} violates its schema: {errors[0]}")
        with open(tmp / MANIFEST, "w") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        faults.point(f"{stage}:manifest")
        target = self.path(stage, key)
        if target.exists():  # another writer won the race; its artifact is equivalent by construction
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        return target

    def clean_stale_temps(self, stage: str) -> None:
        """Remove temp and evicted directories left by processes of this host that no longer exist (killed
        mid-stage); those of live processes or of other hosts are left alone."""
        parent = self.root / stage
        if not parent.is_dir():
            return
        for tmp in [*parent.glob(f"{TMP_PREFIX}*"), *parent.glob(f"{EVICTED_PREFIX}*")]:
            pid, host = _owner(tmp.name)
            if pid is not None and host in (None, _host_tag()) and not _pid_alive(pid):
                log.warning("removing %s left by a run that ended mid-stage (pid %d)", tmp, pid)
                shutil.rmtree(tmp, ignore_errors=True)
        for lock_path in [*parent.glob("*.lock"), *parent.glob(f"*{LEASE_SUFFIX}")]:
            _remove_if_unheld(lock_path)

    def _evict_dir(self, target: Path) -> None:
        """Remove a published entry: renamed aside first, so a reader never sees part of it."""
        aside = target.with_name(f"{EVICTED_PREFIX}{target.name[:16]}-{os.getpid()}@{_host_tag()}-{time.time_ns()}")
        try:
            os.rename(target, aside)
        except FileNotFoundError:
            return
        shutil.rmtree(aside, ignore_errors=True)

    # -- management --------------------------------------------------------------------------------------------
    def entries(self) -> list["Entry"]:
        """Every published entry (valid or not), most recently used first."""
        found = []
        if not self.root.is_dir():
            return found
        for stage_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for d in stage_dir.iterdir():
                if d.is_dir() and not d.name.startswith("."):
                    found.append(Entry.read(stage_dir.name, d))
        return sorted(found, key=lambda e: e.last_used, reverse=True)

    def verify(self, entry: "Entry") -> str | None:
        """Re-hash every output of an entry: None when it matches its manifest, else what is wrong."""
        problem = self._check(entry.path, entry.stage, entry.key)
        if problem is not None:
            return problem
        for name, want in entry.manifest["outputs"].items():
            if "sha256" in want and file_sha256(entry.path / name) != want["sha256"]:
                return f"output {name} does not match its sha256 in the manifest"
        return None

    def remove(self, entry: "Entry") -> None:
        """Remove a published entry; a PipelineError when it is being recomputed or read by a running stage."""
        with self.lock(entry.stage, entry.key, timeout=0.0):
            lease_path = self._lease_path(entry.stage, entry.key)
            fd = os.open(lease_path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                    raise PipelineError(f"{entry.stage}/{entry.key[:16]} is in use: a running stage reads it (it "
                                        f"holds {lease_path}); kept") from None
                self._evict_dir(entry.path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lease_path)  # while holding it: a reader that opened this inode re-checks the path
            finally:
                os.close(fd)

    # -- leases of readers -----------------------------------------------------------------------------------------
    def _lease_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}{LEASE_SUFFIX}"

    @contextlib.contextmanager
    def lease(self, stage: str, key: str) -> Iterator[None]:
        """A shared lease on one key while a run uses its artifact: `remove` and `gc` keep the entry meanwhile.
        Taken before the lookup, so an entry found is an entry kept. Waits only while a removal is under way."""
        lease_path = self._lease_path(stage, key)
        try:
            lease_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lease_path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            log.debug("no lease on %s (%s): a read-only cache is never removed from by this run", lease_path, e)
            fd = None
        if fd is None:
            yield
            return
        while True:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if _is_current(fd, lease_path):
                break
            os.close(fd)  # a removal unlinked the file between our open and our lock: lease the new one
            fd = os.open(lease_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            yield
        finally:
            try:  # the last reader removes the file (a conversion to exclusive succeeds only without other readers)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _is_current(fd, lease_path):
                    os.unlink(lease_path)
            except OSError:
                pass
            finally:
                os.close(fd)

    def gc(self, keep_last: int, kept: list[tuple["Entry", str]] | None = None) -> list["Entry"]:
        """Keep, per stage, the `keep_last` most recently used entries and every entry they were made from;
        remove the rest (and stale temps), but never an entry being recomputed or read by a running stage (those
        are appended to `kept` with the reason). Returns what was removed."""
        entries = self.entries()
        by_key = {(e.stage, e.key): e for e in entries}
        keep: set[tuple[str, str]] = set()
        per_stage: dict[str, int] = {}
        for e in entries:
            if per_stage.get(e.stage, 0) < keep_last:
                per_stage[e.stage] = per_stage.get(e.stage, 0) + 1
                todo = [e]
                while todo:
                    cur = todo.pop()
                    if (cur.stage, cur.key) in keep:
                        continue
                    keep.add((cur.stage, cur.key))
                    todo += [by_key[u] for u in cur.inputs.items() if u in by_key]
        removed = []
        for e in entries:
            if (e.stage, e.key) not in keep:
                try:
                    self.remove(e)
                except PipelineError as err:  # being recomputed or read right now
                    log.info("keeping %s: %s", e.path, err)
                    if kept is not None:
                        kept.append((e, str(err)))
                    continue
                removed.append(e)
        for stage_dir in (p for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else ():
            self.clean_stale_temps(stage_dir.name)
        return removed

    def free_bytes(self) -> int:
        """Free space where artifacts are written (the cache root or its nearest existing parent)."""
        probe = self.root
        while not probe.exists():
            probe = probe.parent
        return shutil.disk_usage(probe).free

    # -- locking ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, stage: str, key: str, poll_seconds: float = 0.2,
             timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[None]:
        """Exclusive lock on one key. Waits while another process holds it (naming that process), and fails after
        `timeout` seconds; a lock file left by a dead process is taken over (its kernel lock died with it)."""
        lock_path = self.root / stage / f"{key}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": HOST, "command": " ".join(sys.argv)[:500]}
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                holder = _read_lock(lock_path) or {}
                who = (f"pid {holder.get('pid')} on host {holder.get('host')} ({holder.get('command')!r})"
                       if holder else "another process")
                if time.monotonic() >= deadline:
                    raise PipelineError(
                        f"cache lock {lock_path} is held by {who}; gave up after lock_timeout={timeout:g} s. If that "
                        f"run is gone (a host that died on a shared file system), remove the lock file; else raise "
                        f"lock_timeout") from None
                if not announced:
                    log.warning("waiting for %s: stage %s (key %s) is being computed by %s; waiting up to "
                                "lock_timeout=%g s", lock_path, stage, key[:12], who, timeout)
                    announced = True
                time.sleep(poll_seconds)
                continue
            if not _is_current(fd, lock_path):  # removed by its holder between our open and lock: lock the new one
                os.close(fd)
                continue
            previous = _parse_lock(os.pread(fd, 1 << 16, 0))
            if previous and previous.get("pid") not in (None, os.getpid()):
                log.warning("taking over the lock %s left by pid %s on host %s (that process is gone)",
                            lock_path, previous.get("pid"), previous.get("host"))
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
            break
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)  # while still holding it: a waiter that locked this inode re-checks the path
            os.close(fd)


@dataclass
class Entry:
    """One published cache entry, as `cache ls` lists it."""

    stage: str
    key: str
    path: Path
    manifest: dict[str, Any]
    last_used: float

    @classmethod
    def read(cls, stage: str, path: Path) -> "Entry":
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            if not isinstance(manifest, dict):
                manifest = {}
        except (OSError, ValueError):
            manifest = {}
        try:
            last_used = path.stat().st_mtime
        except FileNotFoundError:
            last_used = 0.0
        return cls(stage, path.name, path, manifest, last_used)

    @property
    def size(self) -> int:
        return sum(int(o.get("size", 0)) for o in (self.manifest.get("outputs") or {}).values())

    @property
    def inputs(self) -> dict[str, str]:
        return dict(self.manifest.get("inputs") or {})


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _host_tag() -> str:
    return "".join(c if c.isalnum() or c == "." else "_" for c in HOST)


def _owner(name: str) -> tuple[int | None, str | None]:
    """(pid, host) from a temp or evicted directory name; host None for names without one."""
    rest = name.split("-", 2)
    if len(rest) < 3:
        return None, None
    pid_host = rest[2].split("-", 1)[0]
    pid, _, host = pid_host.partition("@")
    return (int(pid), host or None) if pid.isdigit() else (None, None)


def _remove_if_unheld(lock_path: Path) -> None:
    """Remove a lock file nobody holds (left by a process killed before it could remove it)."""
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _is_current(fd, lock_path):
            if lock_path.name.endswith(LEASE_SUFFIX):
                log.info("removing the lease %s left by a run that ended", lock_path)
            else:
                log.info("removing the lock %s left by a run that ended (%s)", lock_path,
                         _parse_lock(os.pread(fd, 4096, 0)))
            os.unlink(lock_path)
    except OSError:
        pass  # held by a live process, or already gone
    finally:
        os.close(fd)


def _is_current(fd: int, path: Path) -> bool:
    """Whether the file open as `fd` is still the one at `path`: a remover unlinks a lock or lease file while holding
    it, so whoever then locks the old inode must open the path again."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return _parse_lock(path.read_bytes())
    except OSError:
        return None


def _parse_lock(raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw)
    except ValueError:  # empty or being written right now
        return None
    return data if isinstance(data, dict) else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
