"""Loading pickles from checkpoints without trusting them.

Every torch pickle goes through `torch.load(weights_only=True)`; where a format stores objects beyond tensors and
containers (Megatron's `args` is an `argparse.Namespace`), the caller names each extra class it admits. The metadata
file of a `torch.distributed.checkpoint` is a plain pickle that PyTorch itself reads with an unrestricted
`pickle.load`: here it is read by an unpickler that admits only the checkpoint metadata classes.
"""

from __future__ import annotations

import argparse
import io
import pickle
import re
from typing import IO, Any, Iterable

import torch

from pipeline.errors import PipelineError

def _numpy_array_globals() -> tuple[Any, ...]:
    """What a pickled numpy array (Megatron's saved numpy RNG state) is made of: the array reconstructor, ndarray,
    dtype and the concrete dtype classes. They build arrays of plain numbers and run nothing else."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    dtype_classes = tuple({type(np.dtype(t)) for t in ("uint8", "uint32", "int32", "int64", "float32", "float64",
                                                       "bool")})
    return (_reconstruct, np.ndarray, np.dtype, *dtype_classes)


# Classes Megatron-LM / DeepSpeed client state holds next to the weights: the training arguments
# (`argparse.Namespace`) and the numpy RNG state (plain arrays). Nothing that runs code on construction.
MEGATRON_ARGS_GLOBALS: tuple[Any, ...] = (argparse.Namespace, *_numpy_array_globals())


def load_torch(f: str | IO[bytes], what: str, allow: Iterable[Any] = (), mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)`, admitting only the `allow`ed classes besides tensors and containers; a
    forbidden global or a damaged file is one PipelineError naming `what`."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global|GLOBAL)[: ]+(?:GLOBAL )?([\w.]+)", str(e))
        name = found.group(1) if found else str(e).splitlines()[0][:200]
        raise PipelineError(f"{what}: refusing to unpickle {name} (only tensors, containers and "
                            f"{sorted(_name(a) for a in allow) or 'nothing else'} are allowed)") from None
    except Exception as e:  # zip or storage errors: truncated or not a torch file
        raise PipelineError(f"{what} is not a loadable torch checkpoint (truncated or corrupt?): "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None


def _name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}" if hasattr(obj, "__qualname__") else repr(obj)


# (module, name) pairs a torch.distributed.checkpoint `.metadata` pickle is made of (PyTorch 2.x).
_DCP = "torch.distributed.checkpoint.metadata"
DCP_METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    (_DCP, "Metadata"), (_DCP, "TensorStorageMetadata"), (_DCP, "BytesStorageMetadata"),
    (_DCP, "ChunkStorageMetadata"), (_DCP, "TensorProperties"), (_DCP, "MetadataIndex"), (_DCP, "StorageMeta"),
    (_DCP, "_MEM_FORMAT_ENCODING"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
})
_TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in DCP_METADATA_GLOBALS or (module == "torch" and name in _TORCH_DTYPES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def load_dcp_metadata(data: bytes, what: str) -> Any:
    """The `Metadata` object of a distributed checkpoint, unpickled with only the metadata classes admitted."""
    try:
        meta = _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise PipelineError(f"{what}: refusing to unpickle {e} (a distributed checkpoint's metadata holds only "
                            "torch.distributed.checkpoint metadata classes)") from None
    except Exception as e:
        raise PipelineError(f"{what} is not a readable distributed checkpoint metadata file: {e}") from None
    if type(meta).__name__ != "Metadata" or not hasattr(meta, "state_dict_metadata"):
        raise PipelineError(f"{what} does not hold torch.distributed.checkpoint Metadata")
    return meta
