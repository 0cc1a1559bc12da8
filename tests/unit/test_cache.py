"""Cache keys, manifests, atomic publish and locks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.cache import ArtifactCache, cache_key, canonical_json


def test_canonical_json_is_order_independent_and_strict():
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == canonical_json({"a": [1, {"c": 3, "d": 2}], "b": 1})
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_golden_cache_key():
    """Key drift must be deliberate: this value changes only if the key recipe changes."""
    key = cache_key("convert", 1, {"dtype": "float32", "mapping": {"tp_size": 2, "pp_size": 1}}, {},
                    {"format": "hf", "files": [{"name": "config.json", "size": 10, "mtime_ns": 1, "sha256": "0" * 64}]})
    assert key == "50361cb220b7969c63247199e7695e0ffc600fe860f53df5f11d90bb7b55539e"


def test_key_depends_on_every_part():
    base = ("convert", 1, {"a": 1}, {"up": "k"}, {"f": 1})
    keys = {cache_key(*base)}
    for i, changed in enumerate((("build",), (2,), ({"a": 2},), ({"up": "j"},), ({"f": 2},))):
        args = list(base)
        args[i] = changed[0]
        keys.add(cache_key(*args))
    assert len(keys) == 6


def _publish(cache: ArtifactCache, stage: str, key: str, payload: bytes = b"data") -> None:
    from pipeline.executor import output_digests

    with cache.staging(stage, key) as tmp:
        (tmp / "out.bin").write_bytes(payload)
        manifest = {"manifest_version": 1, "stage": stage, "stage_version": 1, "key": key, "config": {}, "inputs": {},
                    "external": None, "versions": {}, "outputs": output_digests(tmp), "timings": {"seconds": 0.0},
                    "metrics": {}}
        cache.publish(tmp, stage, key, manifest)


KEY = "a" * 64


@pytest.mark.parametrize("damage", ["delete_manifest", "garble_manifest", "wrong_key", "truncate_output"])
def test_invalid_entry_is_a_miss_and_removed(tmp_path, damage):
    cache = ArtifactCache(tmp_path)
    _publish(cache, "convert", KEY)
    assert cache.lookup("convert", KEY) is not None
    entry = cache.path("convert", KEY)
    if damage == "delete_manifest":
        (entry / "manifest.json").unlink()
    elif damage == "garble_manifest":
        (entry / "manifest.json").write_text("{not json")
    elif damage == "wrong_key":
        m = json.loads((entry / "manifest.json").read_text())
        m["key"] = "b" * 64
        (entry / "manifest.json").write_text(json.dumps(m))
    else:
        (entry / "out.bin").write_bytes(b"da")
    assert cache.lookup("convert", KEY) is None
    assert not entry.exists()


def test_failed_stage_leaves_no_temp_and_nothing_published(tmp_path):
    cache = ArtifactCache(tmp_path)
    with pytest.raises(RuntimeError):
        with cache.staging("convert", KEY) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list((tmp_path / "convert").iterdir()) == []


def test_stale_temp_of_dead_process_is_cleaned(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / "convert" / f".tmp-{KEY[:16]}-{pid}-xyz"
    stale.mkdir(parents=True)
    live = tmp_path / "convert" / f".tmp-{KEY[:16]}-{os.getpid()}-abc"
    live.mkdir()
    ArtifactCache(tmp_path).clean_stale_temps("convert")
    assert not stale.exists() and live.exists()


def test_stale_lock_is_taken_over(tmp_path):
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "convert" / f"{KEY}.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "command": "old"}))
    cache = ArtifactCache(tmp_path)
    with cache.lock("convert", KEY, poll_seconds=0.01):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_a_leased_entry_is_kept_by_remove_and_gc(tmp_path):
    from pipeline.errors import PipelineError

    cache = ArtifactCache(tmp_path)
    _publish(cache, "build", "e" * 64)
    entry = cache.entries()[0]
    with cache.lease("build", "e" * 64):
        with cache.lease("build", "e" * 64):  # two readers share it
            with pytest.raises(PipelineError, match="is in use: a running stage reads it"):
                cache.remove(entry)
        kept = []
        assert cache.gc(0, kept) == [] and [e.key for e, _ in kept] == ["e" * 64]
        assert entry.path.is_dir()
    assert not (tmp_path / "build" / f"{'e' * 64}.lease").exists()  # the last reader removed the file
    assert [e.key for e in cache.gc(0)] == ["e" * 64] and not entry.path.exists()
    assert sorted(p.name for p in (tmp_path / "build").iterdir()) == []
