"""Fixtures of the bad-input corpus: one tiny Llama for all cases, other tiny models and the engine built lazily."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import default_gguf_path, make_tiny_model


class Fixtures:
    def __init__(self, root: Path):
        self.root = root
        self.llama = make_tiny_model(root / "models", "llama_gqa_untied")
        self._tiny: dict[tuple, Path] = {}
        self._engine: Path | None = None
        self._checkpoint: Path | None = None

    def tiny(self, name: str, **overrides) -> Path:
        key = (name, tuple(sorted(overrides.items())))
        if key not in self._tiny:
            self._tiny[key] = make_tiny_model(self.root / f"models-{len(self._tiny)}", name, **overrides)
        return self._tiny[key]

    def engine(self) -> Path:
        """The tiny Llama's cpu engine (built once through the pipeline)."""
        if self._engine is None:
            from pipeline.executor import run_pipeline
            from tests.recipes_util import compose_recipe

            cfg = compose_recipe(["model=hf_local", f"model.path={self.llama}", "progress=false",
                                  "build.smoke_test_tokens=0", "build.max_input_len=64", "build.max_seq_len=128"])
            result = run_pipeline(cfg, self.root / "engine-cache", ["build"], progress=False)
            self._engine = result.stages[-1].artifact
        return self._engine


    def checkpoint_tp2(self) -> Path:
        """The tiny Llama as a tp2 TensorRT-LLM checkpoint (converted once)."""
        if self._checkpoint is None:
            from pipeline.convert.converter import convert
            from pipeline.convert.registry import MappingArgs
            from pipeline.convert.sources import open_source

            src = open_source("hf", self.llama)
            try:
                convert(src, self.root / "checkpoint-tp2", "float32", MappingArgs(2), progress=False)
            finally:
                src.close()
            self._checkpoint = self.root / "checkpoint-tp2"
        return self._checkpoint


@pytest.fixture(scope="session")
def corpus_fixtures(tmp_path_factory) -> Fixtures:
    return Fixtures(tmp_path_factory.mktemp("badinput"))


def has(need: str) -> bool:
    return {"smollm2": default_gguf_path() is not None}[need]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
