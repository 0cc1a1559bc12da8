"""`python -m pipeline.runtime.native build`: compile the CPU engine's quantized kernels into their cache now (an
install step; otherwise the first engine load compiles them). Exit 0 also where they cannot be built here (the
engine then uses torch's kernels): the reason is printed."""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.runtime.native")
    p.add_argument("command", choices=["build", "where"])
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    from pipeline.runtime import native

    if args.command == "where":
        print(native.build_dir())
        return 0
    reason = native.unavailable_reason()
    if reason is not None:
        print(f"compiled quantized kernels not built: {reason}; the engine uses torch's kernels")
        return 0
    try:
        native.build(verbose=args.verbose)
    except Exception as e:
        print(f"compiled quantized kernels not built: {e}; the engine uses torch's kernels", file=sys.stderr)
        return 0
    print(f"compiled quantized kernels ready in {native.build_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
