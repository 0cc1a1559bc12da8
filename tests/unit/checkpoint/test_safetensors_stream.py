"""The streaming writer produces files the safetensors library reads back exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.checkpoint.safetensors_stream import StreamingSafetensorsWriter


def test_roundtrip_all_dtypes(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.randn(2, 2, 2).to(torch.float16),
        "d": torch.randint(-128, 127, (9,), dtype=torch.int8),
        "e": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 3),
    }
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()],
                                   metadata={"source": "test"})
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    back = load_file(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k].view(torch.uint8), v.view(torch.uint8))
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "source": "test"}


def test_out_of_plan_writes_are_refused(tmp_path):
    w = StreamingSafetensorsWriter(tmp_path / "y.safetensors", [("a", (2,), torch.float32), ("b", (2,), torch.float32)])
    with pytest.raises(AssertionError, match="header declares"):
        w.write("b", torch.zeros(2))
    w.write("a", torch.zeros(2))
    with pytest.raises(AssertionError, match="never written"):
        w.close()
