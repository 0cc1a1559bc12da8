"""The content-addressed artifact cache: `<root>/<stage>/<key>/`, published atomically, guarded by lock files.

- key = sha256 of the canonical JSON of the stage's identity (see `cache_key`); never a timestamp or a run path.
- A stage writes into a temp directory beside its target; the executor writes `manifest.json` last (fsynced) and
  renames the directory into place, so a reader sees either nothing or a complete artifact.
- A directory without a valid manifest (or whose manifest lists files that are gone or have another size) is a
  miss: it is removed with a warning and recomputed.
- `<root>/<stage>/<key>.lock` records the pid, host and command of the process computing that key; a second run
  waits for it and then reuses the artifact. A lock whose pid is gone on this host is stale and taken over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import PipelineError
from pipeline.schemas import schema_errors

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"


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
            return json.loads((target / MANIFEST).read_text())
        log.warning("cache entry %s is invalid (%s); removing it and recomputing", target, problem)
        shutil.rmtree(target, ignore_errors=True)
        return None

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
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{key[:16]}-{os.getpid()}-", dir=parent))
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
        target = self.path(stage, key)
        if target.exists():  # another writer won the race; its artifact is equivalent by construction
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        return target

    def clean_stale_temps(self, stage: str) -> None:
        """Remove temp directories left by processes that no longer exist (killed mid-stage)."""
        parent = self.root / stage
        if not parent.is_dir():
            return
        for tmp in parent.glob(f"{TMP_PREFIX}*"):
            parts = tmp.name[len(TMP_PREFIX) :].split("-")
            pid = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
            if pid is not None and not _pid_alive(pid):
                log.warning("removing %s left by a run that ended mid-stage (pid %d)", tmp, pid)
                shutil.rmtree(tmp, ignore_errors=True)

    # -- locking ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, stage: str, key: str, poll_seconds: float = 0.5) -> Iterator[None]:
        """Exclusive lock on one key; waits while a live process holds it, takes over a stale one."""
        lock_path = self.root / stage / f"{key}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}
        announced = False
        while True:
            try:
                fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(lock_path)
                if holder is not None and _lock_is_stale(holder):
                    log.warning("taking over stale lock %s (pid %s is gone)", lock_path, holder.get("pid"))
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(lock_path)
                    continue
                if not announced:
                    log.info("waiting for %s to finish %s (lock %s held by pid %s: %s)", stage, key[:12], lock_path,
                             (holder or {}).get("pid"), (holder or {}).get("command"))
                    announced = True
                time.sleep(poll_seconds)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        # Being written right now, or garbage: treat garbage older than a few seconds as stale.
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        return {"pid": None, "host": None} if age > 5 else None


def _lock_is_stale(holder: dict[str, Any]) -> bool:
    if holder.get("pid") is None:
        return True
    return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder["pid"]))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
