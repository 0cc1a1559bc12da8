"""Engines shared by the backend tests: each architecture's checkpoint, cpu engine and onnx engine are built once
per session, on first use (exports cost seconds each)."""

from __future__ import annotations

import pytest

from pipeline.engine.backends import get_backend
from tests.conftest import make_tiny_model
from tests.engine.checkpoints import BUILD, make_checkpoint


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(arch, tp=1, pp=1) -> {ckpt, cpu, onnx, metrics}: the checkpoint with that mapping and both engines."""
    built: dict[tuple, dict] = {}

    def get(arch: str, tp: int = 1, pp: int = 1) -> dict:
        key = (arch, tp, pp)
        if key not in built:
            root = tmp_path_factory.mktemp(f"{arch}_tp{tp}pp{pp}")
            model = built[(arch, 1, 1)]["ckpt"].parent / arch if (arch, 1, 1) in built else make_tiny_model(root, arch)
            ckpt = make_checkpoint(model, root / "ckpt", tp=tp, pp=pp)
            get_backend("cpu").build(ckpt, root / "cpu", BUILD)
            metrics = get_backend("onnx").build(ckpt, root / "onnx", {**BUILD, "backend": "onnx"})
            built[key] = {"ckpt": ckpt, "cpu": root / "cpu", "onnx": root / "onnx", "metrics": metrics}
        return built[key]

    return get
