"""Exhaustive crash-and-resume matrix: kill -9 the pipeline at every fault point (every tensor of the conversion and
every engine rank file included), re-run the same command, and check that it completes with artifacts
byte-identical to an uninterrupted run and leaves no temp directory or lock behind.

    python scripts/crash_matrix.py [--tp 2] [--limit N]

Prints one line per point and exits non-zero if any point fails. The CI test (tests/hardening/test_crash_resume.py)
runs a sample of these points.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.badinput.harness import invoke  # noqa: E402
from tests.conftest import make_tiny_model  # noqa: E402
from tests.hardening.common import final_outputs, leftovers, recipe, spawn  # noqa: E402

EXECUTOR_POINTS = ("start", "locked", "outputs", "manifest", "published")


def points(tensors: int, ranks: int) -> list[str]:
    found = []
    for stage, inner, count in (("convert", "tensor", tensors), ("build", "rank", ranks)):
        found += [f"{stage}:{p}" for p in EXECUTOR_POINTS[:2]]
        found += [f"{stage}:{inner}#{i}" for i in range(1, count + 1)]
        found += [f"{stage}:{p}" for p in EXECUTOR_POINTS[2:]]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="only the first N points (0: all)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="crash-matrix-"))
    model = make_tiny_model(root / "models", "llama_mha_tied")
    extra = (f"mapping.tp_size={args.tp}",)
    ref = invoke(recipe(model, root / "ref-cache", root / "ref-run", *extra))
    if ref.code != 0:
        print(ref.stderr)
        return 1
    reference = final_outputs(root / "ref-run")
    manifest = json.loads((Path(json.loads((root / "ref-run" / "run.json").read_text())["stages"]["convert"]["artifact"])
                           / "manifest.json").read_text())
    tensors = manifest["metrics"]["tensors"] // args.tp  # the point is reached once per target (all ranks written)
    todo = points(tensors, args.tp)
    if args.limit:
        todo = todo[: args.limit]
    failures = 0
    for i, point in enumerate(todo):
        work = root / f"p{i}"
        killed = spawn(recipe(model, work / "cache", work / "killed", *extra), TRTLLM_PIPELINE_KILL_AT=point)
        _, err = killed.communicate(timeout=600)
        problems = []
        if killed.returncode != -signal.SIGKILL:
            problems.append(f"not killed (exit {killed.returncode})")
        again = invoke(recipe(model, work / "cache", work / "again", *extra))
        if again.code != 0:
            problems.append(f"re-run failed: {again.stderr.strip()[-300:]}")
        elif final_outputs(work / "again") != reference:
            problems.append("final artifacts differ from the uninterrupted run")
        if leftovers(work / "cache"):
            problems.append(f"left behind: {leftovers(work / 'cache')}")
        failures += bool(problems)
        print(f"{point:<22} {'ok' if not problems else 'FAILED: ' + '; '.join(problems)}", flush=True)
    print(f"{len(todo) - failures}/{len(todo)} kill points recovered to identical artifacts")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
