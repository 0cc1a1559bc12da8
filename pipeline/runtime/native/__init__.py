"""The CPU engine's compiled kernels: weight-only quantized GEMV / small GEMM (`quant_gemm.cpp`, AVX2 + FMA + F16C;
its weight kernels, `weight_kernels.h`, also in an AVX-512 instance that runs where the CPU has AVX-512 F/BW/VL/DQ).

The module is compiled from this package's own source by torch's extension builder (torch.utils.cpp_extension, the
compiler and flags torch itself expects), once: `python -m pipeline.runtime.native build` (scripts/setup.sh runs it
after installing), or on first use when an engine is loaded. It is cached under a directory named by a hash of the
source, the torch version and the flags, so an upgrade rebuilds and concurrent processes share one build (torch's
builder locks the directory); later processes import the built module directly, needing neither compiler nor
ninja. Where it cannot be built or loaded (no C++ compiler, no ninja, a CPU without AVX2/FMA, a failed compile),
`load()` returns None after one line on stderr and the engine keeps torch's kernels.

$TRTLLM_PIPELINE_NATIVE_ISA=avx2 keeps the weight kernels on their AVX2 instance where the CPU has AVX-512 (to
compare the two, or to match an AVX2 machine's float32 rounding); unset (or `best`), they run the widest instance
this CPU has. Asking for an instance the CPU lacks gives one line on stderr and the widest it has.

The cache directory: $TRTLLM_PIPELINE_NATIVE_DIR if set, else the `native` folder of `<sys.prefix>/var/trtllm-pipeline`
(the virtual environment's own tree) when writable, else the `native` folder of `~/.cache/trtllm-pipeline`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("quant_gemm.cpp")
HEADERS = (Path(__file__).with_name("weight_kernels.h"),)  # included by SOURCE: part of the build's identity
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off")
LDFLAGS = ("-fopenmp",)
DISABLE_ENV = "TRTLLM_PIPELINE_NATIVE"  # "0": never build or load the compiled kernels
ISA_ENV = "TRTLLM_PIPELINE_NATIVE_ISA"  # "avx2", "avx512" or "best" (the default): the weight kernels' instance


@functools.cache
def _tag() -> str:
    import torch

    h = hashlib.sha256(SOURCE.read_bytes())
    for header in HEADERS:
        h.update(header.read_bytes())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{' '.join(CFLAGS + LDFLAGS)}".encode())
    return h.hexdigest()[:12]


def cache_root() -> Path:
    if os.environ.get("TRTLLM_PIPELINE_NATIVE_DIR"):
        return Path(os.environ["TRTLLM_PIPELINE_NATIVE_DIR"])
    in_env = Path(sys.prefix) / "var" / "trtllm-pipeline" / "native"
    try:
        in_env.mkdir(parents=True, exist_ok=True)
        if os.access(in_env, os.W_OK):
            return in_env
    except OSError:
        pass
    return Path.home() / ".cache" / "trtllm-pipeline" / "native"


def build_dir() -> Path:
    return cache_root() / _tag()


def _module_name() -> str:
    return f"trtllm_pipeline_quant_gemm_{_tag()}"


def _built() -> Path | None:
    return next(iter(sorted(build_dir().glob(f"{_module_name()}*.so"))), None)


def _import_built(path: Path):
    """Import an already-built module directly: torch's builder would re-check the compiler and run ninja (needing
    both at run time, and about a second per process) just to find the build up to date."""
    import importlib.util

    import torch  # noqa: F401  (the module links against libtorch, which must be loaded first)

    spec = importlib.util.spec_from_file_location(_module_name(), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unavailable_reason() -> str | None:
    """Why the compiled kernels cannot be used here, before trying to build them (None: they can)."""
    import torch

    if os.environ.get(DISABLE_ENV) == "0":
        return f"{DISABLE_ENV}=0"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2/FMA (torch reports {torch.backends.cpu.get_cpu_capability()})"
    if _built() is None:
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            return f"no C++ compiler ({compiler}) to build them"
        if shutil.which("ninja", path=_build_path()) is None:
            return "ninja, which torch's extension builder needs, is not installed (pip install ninja)"
    return None


def _build_path() -> str:
    """PATH for the build: the interpreter's own bin/ first, where the `ninja` package puts its program, since a
    virtual environment used without activating it is not on PATH."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def build(verbose: bool = False):
    """Compile (or find the cached build of) the kernels and import them. Raises on failure.

    One process builds at a time, under an flock of the build directory (released by the kernel when a builder dies).
    torch's own build lock is a plain file that a killed build leaves behind, after which every later build would
    wait for it forever: holding the flock, no one else is building, so such a file is stale and is removed."""
    import fcntl

    import torch.utils.cpp_extension as ext

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "build.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (directory / "lock").unlink(missing_ok=True)
        os.environ["PATH"] = _build_path()
        # copies of the flags: torch's builder appends to the lists it is given (and the tag hashes them)
        return ext.load(name=_module_name(), sources=[str(SOURCE)], extra_cflags=list(CFLAGS),
                        extra_ldflags=list(LDFLAGS), build_directory=str(directory), verbose=verbose)


@functools.cache
def load():
    """The compiled kernel module, built on first use; None (after one line on stderr) where it cannot be."""
    reason = unavailable_reason()
    if reason is None:
        try:
            built = _built()
            if built is None:
                print(f"building the quantized CPU kernels into {build_dir()} (once, about a minute)",
                      file=sys.stderr)
            return choose_isa(_import_built(built) if built is not None else build())
        except Exception as e:  # a compiler error, a missing header: the torch kernels still work
            reason = f"building them failed ({str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__})"
    if os.environ.get(DISABLE_ENV) != "0":
        print(f"note: compiled quantized kernels unavailable: {reason}; using torch's kernels", file=sys.stderr)
    return None


def choose_isa(module, wanted: str | None = None):
    """Set the weight kernels' instance from `wanted` (default: $TRTLLM_PIPELINE_NATIVE_ISA; unset or `best`: the
    widest this CPU has); returns the module. An instance the CPU lacks, or an unknown name: one line on stderr and
    the widest."""
    wanted = (os.environ.get(ISA_ENV, "") if wanted is None else wanted).strip().lower() or "best"
    supported = module.supported_isas()
    if wanted not in (*supported, "best"):
        known = "avx2, avx512 or best"
        why = f"this CPU runs {', '.join(supported)}" if wanted in ("avx2", "avx512") else f"expected {known}"
        print(f"note: {ISA_ENV}={wanted} ignored ({why}); using {supported[-1]}", file=sys.stderr)
        wanted = "best"
    module.set_isa(supported[-1] if wanted == "best" else wanted)
    return module
