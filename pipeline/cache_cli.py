"""`trtllm-pipeline cache ls|verify|gc|rm`: inspect and manage the artifact cache.

- `ls`: every entry with stage, key, size, last use and whether its files still have the manifest's sizes;
- `verify`: re-hash every output file against the manifest's sha256 and evict entries that do not match;
- `gc --keep-last N`: keep per stage the N most recently used entries and everything they were made from;
- `rm KEY...`: remove entries by key or unique key prefix.
`gc` and `rm` keep (and name) an entry that a running stage is computing or reading (exit code 1 for `rm`).
The cache directory is `--cache-dir` (default: the recipe's `cache_dir`, outputs/cache).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline.cache import ArtifactCache, Entry
from pipeline.errors import PipelineError

DEFAULT_CACHE_DIR = "outputs/cache"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trtllm-pipeline cache", description="Inspect and manage the artifact cache.")
    parser.add_argument("--cache-dir", type=Path, default=Path(DEFAULT_CACHE_DIR))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list entries, most recently used first")
    sub.add_parser("verify", help="re-hash every output and evict corrupt entries")
    gc = sub.add_parser("gc", help="remove all but the most recently used entries")
    gc.add_argument("--keep-last", type=int, required=True, metavar="N")
    rm = sub.add_parser("rm", help="remove entries by key (or unique key prefix)")
    rm.add_argument("keys", nargs="+")
    return parser


def cache_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    cache = ArtifactCache(args.cache_dir)
    try:
        return {"ls": _ls, "verify": _verify, "gc": _gc, "rm": _rm}[args.command](cache, args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def _ls(cache: ArtifactCache, args) -> int:
    entries = cache.entries()
    print(f"{'stage':<10} {'key':<16} {'size':>10}  {'last used':<19}  state")
    for e in entries:
        problem = cache._check(e.path, e.stage, e.key)
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))
        print(f"{e.stage:<10} {e.key[:16]:<16} {_size(e.size):>10}  {used:<19}  {'ok' if problem is None else problem}")
    print(f"{len(entries)} entries, {_size(sum(e.size for e in entries))} in {cache.root}")
    return 0


def _verify(cache: ArtifactCache, args) -> int:
    entries = cache.entries()
    bad = 0
    for e in entries:
        problem = cache.verify(e)
        if problem is not None:
            bad += 1
            print(f"corrupt: {e.stage}/{e.key[:16]}: {problem}; evicted")
            cache._evict_dir(e.path)
    print(f"verified {len(entries)} entries: {len(entries) - bad} ok, {bad} corrupt (evicted)")
    return 1 if bad else 0


def _gc(cache: ArtifactCache, args) -> int:
    if args.keep_last < 0:
        raise PipelineError(f"cache gc: --keep-last must be >= 0, got {args.keep_last}")
    kept: list[tuple[Entry, str]] = []
    removed = cache.gc(args.keep_last, kept)
    for e in removed:
        print(f"removed {e.stage}/{e.key[:16]} ({_size(e.size)})")
    for e, reason in kept:
        print(f"kept {e.stage}/{e.key[:16]}: {reason}")
    print(f"removed {len(removed)} entries, {_size(sum(e.size for e in removed))}"
          + (f"; kept {len(kept)} in use" if kept else ""))
    return 0


def _find(cache: ArtifactCache, prefix: str) -> Entry:
    matches = [e for e in cache.entries() if e.key.startswith(prefix)]
    if not matches:
        raise PipelineError(f"cache rm: no entry has a key starting with {prefix!r} in {cache.root}")
    if len(matches) > 1:
        raise PipelineError(f"cache rm: {prefix!r} matches {len(matches)} entries "
                            f"({', '.join(f'{e.stage}/{e.key[:16]}' for e in matches[:4])}); give more of the key")
    return matches[0]


def _rm(cache: ArtifactCache, args) -> int:
    entries = [_find(cache, k) for k in args.keys]
    in_use = 0
    for e in entries:
        try:
            cache.remove(e)
        except PipelineError as err:  # being recomputed or read by a running stage
            print(f"kept {e.stage}/{e.key[:16]}: {err}")
            in_use += 1
            continue
        print(f"removed {e.stage}/{e.key[:16]} ({_size(e.size)})")
    return 1 if in_use else 0
