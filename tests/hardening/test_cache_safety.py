"""Corruption is a miss, `cache ls|verify|gc|rm`, gc/rm keep what a running stage reads, ENOSPC and free-disk checks,
and locks held on other hosts."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipeline.cache import ArtifactCache
from pipeline.errors import PipelineError
from tests.badinput.harness import invoke
from tests.conftest import make_tiny_model
from tests.hardening.common import REPO, leftovers, recipe, spawn


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("cache_safety"), "llama_mha_tied")


def convert(model: Path, cache: Path, run: Path, *extra: str):
    return invoke(["model=hf_local", f"model.path={model}", f"cache_dir={cache}", "progress=false",
                   f"hydra.run.dir={run}", "stages=[convert]", *extra])


def record(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())["stages"]


def test_same_size_corruption_is_found_by_verify_and_recomputed(model, tmp_path):
    cache = tmp_path / "cache"
    assert convert(model, cache, tmp_path / "r1").code == 0
    artifact = Path(record(tmp_path / "r1")["convert"]["artifact"])
    rank0 = artifact / "rank0.safetensors"
    data = bytearray(rank0.read_bytes())
    data[-1] ^= 0xFF  # same size: the cheap lookup check cannot see it, verify can
    rank0.write_bytes(bytes(data))
    ls = invoke(["cache", "--cache-dir", str(cache), "ls"])
    assert ls.code == 0 and "convert" in ls.stdout and "1 entries" in ls.stdout
    verify = invoke(["cache", "--cache-dir", str(cache), "verify"])
    assert verify.code == 1 and "rank0.safetensors does not match its sha256" in verify.stdout
    assert not artifact.exists()
    assert convert(model, cache, tmp_path / "r2").code == 0
    assert record(tmp_path / "r2")["convert"]["reused"] is False


def test_truncated_output_is_a_miss_on_lookup(model, tmp_path):
    cache = tmp_path / "cache"
    assert convert(model, cache, tmp_path / "r1").code == 0
    artifact = Path(record(tmp_path / "r1")["convert"]["artifact"])
    with open(artifact / "rank0.safetensors", "r+b") as f:
        f.truncate(100)
    assert convert(model, cache, tmp_path / "r2").code == 0
    assert record(tmp_path / "r2")["convert"]["reused"] is False
    assert invoke(["cache", "--cache-dir", str(cache), "verify"]).code == 0


def test_gc_keeps_the_last_used_and_rm_removes_by_key_prefix(model, tmp_path):
    cache = tmp_path / "cache"
    for i, dtype in enumerate(("float32", "float16", "bfloat16")):
        assert convert(model, cache, tmp_path / f"r{i}", f"dtype={dtype}").code == 0
    keys = [record(tmp_path / f"r{i}")["convert"]["key"] for i in range(3)]
    assert convert(model, cache, tmp_path / "again", "dtype=float32").code == 0  # float32 is now the last used
    gc = invoke(["cache", "--cache-dir", str(cache), "gc", "--keep-last", "1"])
    assert gc.code == 0 and "removed 2 entries" in gc.stdout
    assert [e.key for e in ArtifactCache(cache).entries()] == [keys[0]]
    rm = invoke(["cache", "--cache-dir", str(cache), "rm", keys[0][:10]])
    assert rm.code == 0 and ArtifactCache(cache).entries() == []
    missing = invoke(["cache", "--cache-dir", str(cache), "rm", "ffff"])
    assert missing.code == 2 and missing.stderr.startswith("error: cache rm: no entry")


def test_no_space_left_while_writing_is_one_error_and_the_cache_stays_valid(model, tmp_path, monkeypatch):
    from pipeline.checkpoint import safetensors_stream

    original = safetensors_stream.StreamingSafetensorsWriter.write
    calls = {"n": 0}

    def full_disk(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path) if hasattr(self, "path") else None)
        return original(self, name, tensor)

    monkeypatch.setattr(safetensors_stream.StreamingSafetensorsWriter, "write", full_disk)
    cache = tmp_path / "cache"
    result = convert(model, cache, tmp_path / "r1")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.code == 2 and len(errors) == 1, result.stderr
    assert "stage convert: no space left while writing" in errors[0] and "nothing was published" in errors[0]
    assert ArtifactCache(cache).entries() == [] and leftovers(cache) == []
    monkeypatch.setattr(safetensors_stream.StreamingSafetensorsWriter, "write", original)
    assert convert(model, cache, tmp_path / "r2").code == 0


def test_too_little_free_disk_fails_before_writing(model, tmp_path, monkeypatch):
    monkeypatch.setattr(ArtifactCache, "free_bytes", lambda self: 10 << 20)
    result = convert(model, tmp_path / "cache", tmp_path / "r1")
    assert result.code == 2
    assert "10.0 MiB free, but this run writes about" in result.stderr and "(convert ~" in result.stderr
    assert not (tmp_path / "cache" / "convert").exists()


HOLDER = """
import fcntl, json, os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": 4242, "host": "build-node-7", "command": "trtllm-pipeline mapping=tp2"}).encode())
print("held", flush=True)
sys.stdin.readline()
os.unlink(sys.argv[1])
"""


def hold(lock: Path) -> subprocess.Popen:
    """A live process (as if on another host of a shared file system) holding a key's lock until told."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_of_a_live_holder_elsewhere_times_out_naming_it(tmp_path):
    cache = ArtifactCache(tmp_path)
    holder = hold(tmp_path / "convert" / f"{'a' * 64}.lock")
    try:
        with pytest.raises(PipelineError) as e:
            with cache.lock("convert", "a" * 64, poll_seconds=0.01, timeout=0.2):
                pass
        assert "held by pid 4242 on host build-node-7 ('trtllm-pipeline mapping=tp2')" in str(e.value)
        assert "lock_timeout=0.2" in str(e.value)
        cache.clean_stale_temps("convert")  # a held lock is not stale
        assert (tmp_path / "convert" / f"{'a' * 64}.lock").exists()
    finally:
        holder.communicate("go\n", timeout=60)


def test_lock_is_waited_for_with_a_message_then_taken(tmp_path, caplog):
    cache = ArtifactCache(tmp_path)
    holder = hold(tmp_path / "convert" / f"{'b' * 64}.lock")
    waiting = threading.Event()

    class Notice:
        level = 0

        def handle(self, record):
            if "waiting for" in record.getMessage():
                assert "pid 4242 on host build-node-7" in record.getMessage()
                waiting.set()

    import logging

    handler = logging.Handler()
    handler.handle = Notice().handle  # type: ignore[method-assign]
    logging.getLogger("pipeline.cache").addHandler(handler)
    acquired = threading.Event()

    def take():
        with cache.lock("convert", "b" * 64, poll_seconds=0.01, timeout=600):
            acquired.set()

    try:
        t = threading.Thread(target=take)
        t.start()
        assert waiting.wait(60) and not acquired.is_set()
        holder.communicate("go\n", timeout=60)
        t.join(60)
        assert acquired.is_set()
    finally:
        logging.getLogger("pipeline.cache").removeHandler(handler)
        if holder.poll() is None:
            holder.communicate("go\n", timeout=60)


def cache_command(cache: Path, *args: str) -> subprocess.CompletedProcess:
    """`trtllm-pipeline cache ARGS` as a real process."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", "--cache-dir", str(cache), *args],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_gc_and_rm_keep_an_entry_a_running_stage_reads(model, tmp_path):
    cache = tmp_path / "cache"
    assert convert(model, cache, tmp_path / "old", "dtype=float16").code == 0  # an entry nobody uses
    old = record(tmp_path / "old")["convert"]["key"]
    # A real run, held by a barrier when its build stage is about to read its convert artifact: the barrier
    # releases it once this test has registered too.
    barrier = tmp_path / "barrier"
    run = spawn(recipe(model, cache, tmp_path / "run"), TRTLLM_PIPELINE_BARRIER=f"{barrier}:2@build:locked")
    try:
        while not (barrier.is_dir() and any(barrier.iterdir())):  # the run registers a file there on arrival
            assert run.poll() is None, run.communicate()[1]
            threading.Event().wait(0.05)
        in_use = next(e for e in ArtifactCache(cache).entries() if e.stage == "convert" and e.key != old)
        gc = cache_command(cache, "gc", "--keep-last", "0")
        assert gc.returncode == 0, gc.stderr
        assert f"removed convert/{old[:16]}" in gc.stdout
        assert f"kept convert/{in_use.key[:16]}: convert/{in_use.key[:16]} is in use: a running stage reads it" \
            in gc.stdout and "kept 1 in use" in gc.stdout
        rm = cache_command(cache, "rm", in_use.key)
        assert rm.returncode == 1 and f"kept convert/{in_use.key[:16]}" in rm.stdout, rm.stdout + rm.stderr
        assert in_use.path.is_dir()
    finally:
        barrier.mkdir(exist_ok=True)
        (barrier / "test").touch()
        _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    stages = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]
    assert stages["convert"]["key"] == in_use.key and Path(stages["build"]["artifact"]).is_dir()
    # the run ended: nothing is in use any more
    gc = cache_command(cache, "gc", "--keep-last", "0")
    assert gc.returncode == 0 and "removed 2 entries" in gc.stdout, gc.stdout
    assert ArtifactCache(cache).entries() == [] and leftovers(cache) == []
