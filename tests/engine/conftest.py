"""Engines shared by the backend tests: each architecture's checkpoint, cpu engine and onnx engine are built once
per session, on first use (exports cost seconds each)."""

from __future__ import annotations

import pytest

from pipeline.engine.backends import get_backend
from tests.conftest import make_tiny_model
from tests.engine.checkpoints import BUILD, make_checkpoint


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    built: dict[str, dict] = {}

    def get(arch: str) -> dict:
        if arch not in built:
            root = tmp_path_factory.mktemp(arch)
            ckpt = make_checkpoint(make_tiny_model(root, arch), root / "ckpt")
            get_backend("cpu").build(ckpt, root / "cpu", BUILD)
            metrics = get_backend("onnx").build(ckpt, root / "onnx", {**BUILD, "backend": "onnx"})
            built[arch] = {"ckpt": ckpt, "cpu": root / "cpu", "onnx": root / "onnx", "metrics": metrics}
        return built[arch]

    return get
