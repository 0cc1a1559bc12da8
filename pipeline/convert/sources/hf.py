"""HuggingFace checkpoint directories: config.json plus safetensors (sharded with an index, or not), or
`pytorch_model*.bin` read with `torch.load(weights_only=True)` (never an unrestricted unpickle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from pipeline.convert.sources import register_source
from pipeline.convert.sources.base import SourceModel
from pipeline.convert.sources.files import fingerprint_safetensors, fingerprint_whole, fingerprint_zip
from pipeline.errors import PipelineError

if TYPE_CHECKING:  # imported where tensors are read, so that fingerprinting a checkpoint imports no torch
    import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise PipelineError(f"{what}: {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{what}: {path} must hold a JSON object")
    return data


def _pickle_problem(e: Exception) -> str:
    """torch's weights_only refusal spans many lines; keep the line that names the forbidden global."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported global" in line]
    if named:
        return (f"its pickle calls a global outside the allow-list ({named[0]}); expected only tensors and "
                "containers, refused without running it (weights_only=True)")
    return lines[0] if lines else type(e).__name__


def weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files, preferring safetensors, and the name -> file map of an index if there is one."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index_path = directory / index_name
        if index_path.exists():
            weight_map = read_json(index_path, "weight index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise PipelineError(f"weight index {index_path} has no 'weight_map' object")
            files = sorted({directory / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise PipelineError(f"weight index {index_path} names shard {f.name}, which does not exist")
            return files, weight_map
    for pattern in ("model.safetensors", "model-*.safetensors", "pytorch_model.bin", "pytorch_model-*.bin"):
        files = sorted(directory.glob(pattern))
        if files:
            return files, None
    raise PipelineError(
        f"no weights in {directory}: expected {SAFETENSORS_INDEX}, model.safetensors, model-*.safetensors, "
        f"{BIN_INDEX} or pytorch_model.bin"
    )


def _fingerprint(directory: Path, files: list[Path]) -> dict[str, Any]:
    entries = [fingerprint_whole(directory / "config.json")]
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        if (directory / index_name).exists():
            entries.append(fingerprint_whole(directory / index_name))
    for f in files:
        entries.append(fingerprint_safetensors(f) if f.suffix == ".safetensors" else fingerprint_zip(f))
    return {"format": "hf", "files": entries}


def hf_fingerprint(directory: Path) -> dict[str, Any]:
    """`HFSource(directory).fingerprint()` without opening the checkpoint: config, index and weight headers."""
    if not directory.is_dir():
        raise PipelineError(f"model.path: {directory} is not a directory")
    return _fingerprint(directory, weight_files(directory)[0])


@register_source("hf")
class HFSource(SourceModel):
    def __init__(self, path: Path):
        if not path.is_dir():
            raise PipelineError(f"model.path: {path} is not a directory (an HF checkpoint holds config.json and weights)")
        self.dir = path
        self.config_path = path / "config.json"
        self.hf_config = read_json(self.config_path, "HF config")
        self._files, self._index = weight_files(path)
        self._handles: dict[Path, Any] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        self._location = self._index_tensors()

    # -- discovery -------------------------------------------------------------------------------------------
    def _index_tensors(self) -> dict[str, Path]:
        """Map every tensor to its file, checking an index against the shards before any data is read."""
        location: dict[str, Path] = {}
        for f in self._files:
            for name in self._file_names(f):
                if name in location:
                    raise PipelineError(f"tensor {name} is stored twice: in {location[name].name} and {f.name}")
                location[name] = f
        if self._index is not None:
            for name, shard in self._index.items():
                if location.get(name) != self.dir / shard:
                    raise PipelineError(f"the weight index says tensor {name} is in {shard}, but that file lacks it")
            extra = sorted(set(location) - set(self._index))
            if extra:
                raise PipelineError(f"shards hold tensors the weight index does not list, e.g. {extra[0]}")
        return location

    def _file_names(self, f: Path) -> list[str]:
        if f.suffix == ".safetensors":
            return list(self._safetensors(f).keys())
        return list(self._bin(f).keys())

    def _safetensors(self, f: Path):
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except Exception as e:  # the Rust error type is not importable in a stable way
                raise PipelineError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        return self._handles[f]

    def _bin(self, f: Path) -> dict[str, torch.Tensor]:
        import torch

        # mmap keeps only the touched tensors resident; weights_only refuses anything but tensors and containers.
        if self._bin_cache is None or self._bin_cache[0] != f:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise PipelineError(f"{f} is not a loadable torch checkpoint: {_pickle_problem(e)}") from None
            if not isinstance(state, dict):
                raise PipelineError(f"{f} does not hold a state dict")
            self._bin_cache = (f, state)
        return self._bin_cache[1]

    # -- SourceModel -----------------------------------------------------------------------------------------
    def names(self) -> set[str]:
        return set(self._location)

    def where(self, name: str) -> str:
        return str(self._location[name])

    def shape(self, name: str) -> tuple[int, ...]:
        f = self._location[name]
        if f.suffix == ".safetensors":
            return tuple(self._safetensors(f).get_slice(name).get_shape())
        return tuple(self._bin(f)[name].shape)

    def is_float(self, name: str) -> bool | None:
        f = self._location[name]
        if f.suffix == ".safetensors":
            return self._safetensors(f).get_slice(name).get_dtype() in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
        return self._bin(f)[name].is_floating_point()

    def read(self, name: str) -> torch.Tensor:
        f = self._location[name]
        try:
            if f.suffix == ".safetensors":
                return self._safetensors(f).get_tensor(name)
            return self._bin(f)[name].clone()
        except PipelineError:
            raise
        except Exception as e:
            raise PipelineError(f"cannot read tensor {name} from {f} (truncated or corrupt?): {e}") from None

    def fingerprint(self) -> dict[str, Any]:
        return _fingerprint(self.dir, self._files)

    def has_tokenizer(self) -> bool:
        return any((self.dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))

    def tokenizer(self):
        if not self.has_tokenizer():
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.dir)

    def transformers_model(self, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.dir, dtype=dtype).eval()

    def close(self) -> None:
        self._handles.clear()
        self._bin_cache = None
