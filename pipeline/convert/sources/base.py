"""The interface every model source implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: choosing a source and fingerprinting it import no tensor library
    import torch


class SourceModel(ABC):
    """A model on disk: its HF-style config and its tensors under HF names, read one at a time."""

    #: HF `config.json` contents (for non-HF formats, the equivalent built from the file's metadata).
    hf_config: dict[str, Any]

    @abstractmethod
    def names(self) -> set[str]:
        """Every tensor name the source holds."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor without reading its data."""

    @abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, in (out, in) orientation, as a float tensor."""

    def is_float(self, name: str) -> bool | None:
        """Whether a tensor is stored as floating point (None: the source cannot tell without reading it)."""
        return None

    @abstractmethod
    def where(self, name: str) -> str:
        """The file that holds a tensor, for error messages."""

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """A JSON-able identity of the source files, cheap to compute, that changes when their content does."""

    def tokenizer(self):  # noqa: B027 - optional hook
        """The model's tokenizer (a transformers tokenizer), or None when the source carries none."""
        return None

    def has_tokenizer(self) -> bool:
        """Whether `tokenizer()` would return one (cheap where the source can tell without loading it)."""
        return self.tokenizer() is not None

    def transformers_model(self, dtype: torch.dtype):
        """The same model loaded by `transformers` (the reference the engine is compared with)."""
        raise NotImplementedError(f"{type(self).__name__} has no transformers reference")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release open files."""
