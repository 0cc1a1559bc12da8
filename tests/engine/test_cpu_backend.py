"""The cpu backend's tensor plan read without an engine file (`CheckpointRank`, what calibration runs) gives what a
built engine holds."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open

from pipeline.checkpoint.safetensors_stream import read_header
from pipeline.engine.backends import get_backend
from pipeline.engine.cpu import CheckpointRank
from pipeline.errors import PipelineError
from tests.conftest import make_tiny_model
from tests.engine.checkpoints import BUILD, make_checkpoint


@pytest.mark.parametrize("arch", ["llama_gqa_untied", "gpt2"])  # a gated MLP (fc and gate fused on read) and a plain one
def test_checkpoint_rank_reads_what_the_engine_holds(tmp_path, arch):
    ckpt = make_checkpoint(make_tiny_model(tmp_path, arch), tmp_path / "ckpt")
    get_backend("cpu").build(ckpt, tmp_path / "cpu", BUILD)
    engine = tmp_path / "cpu" / "rank0.engine"
    meta = json.loads(read_header(engine)[0]["__metadata__"]["engine"])
    with CheckpointRank.open(ckpt, BUILD) as view, safe_open(str(engine), framework="pt") as f:
        assert asdict(view.args) == meta["model"]
        assert sorted(view.keys()) == sorted(f.keys())
        for name in view.keys():
            assert torch.equal(view.get_tensor(name), f.get_tensor(name)), name


def test_checkpoint_rank_refuses_quantized_checkpoints(tmp_path):
    ckpt = make_checkpoint(make_tiny_model(tmp_path, "llama_gqa_untied"), tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization"] = {**(config.get("quantization") or {}), "quant_algo": "W8A16"}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError, match="float checkpoints only"):
        CheckpointRank.open(ckpt, BUILD)
