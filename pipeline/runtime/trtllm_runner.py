"""Engines built by TensorRT-LLM's trtllm-build, run by `tensorrt_llm.runtime.ModelRunner` behind our ModelRunner
API (the argument names are TensorRT-LLM's own, so this is a thin adapter). One process per rank under mpirun,
as TensorRT-LLM requires; every rank returns the outputs on the CPU."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from pipeline.errors import PipelineError
from pipeline.runtime.parallel import mpi_world

ENGINE_SUBDIR = "trtllm"  # trtllm-build's output inside our engine directory
INSTALL_HINT = ("running a trtllm engine needs TensorRT-LLM (a release up to 1.x) on a machine with a GPU: "
                "pip install 'tensorrt-llm<2' --extra-index-url https://pypi.nvidia.com")


@dataclass
class _Rank:
    rank: int
    world_size: int


class TrtllmRunner:
    def __init__(self, runner: Any, config: dict[str, Any], rank: int, load_seconds: float):
        self.runner, self.config = runner, config
        self.limits = config["build_config"]
        self.dist = _Rank(rank, config["pretrained_config"]["mapping"]["world_size"])
        self.load_seconds = load_seconds

    @classmethod
    def from_dir(cls, engine_dir: Path, config: dict[str, Any], rank: int | None = None) -> "TrtllmRunner":
        started = time.perf_counter()
        try:
            from tensorrt_llm.runtime import ModelRunner as TrtllmModelRunner
        except ImportError as e:
            raise PipelineError(f"{INSTALL_HINT} ({e})") from None
        world = config["pretrained_config"]["mapping"]["world_size"]
        mpi_rank, mpi_size = mpi_world()
        if world > 1 and mpi_size != world:
            raise PipelineError(f"{engine_dir} was built for world_size={world} but this job has {mpi_size} rank(s); "
                                f"launch it with: mpirun -n {world} ...")
        rank = mpi_rank if world > 1 else (rank or 0)
        runner = TrtllmModelRunner.from_dir(engine_dir=str(Path(engine_dir) / ENGINE_SUBDIR), rank=rank)
        return cls(runner, config, rank, time.perf_counter() - started)

    @property
    def vocab_size(self) -> int:
        return self.config["pretrained_config"]["vocab_size"]

    def generate(self, batch_input_ids: Sequence[torch.Tensor], max_new_tokens: int, end_id: int, pad_id: int,
                 temperature: float = 1.0, top_k: int = 1, top_p: float = 0.0, num_beams: int = 1,
                 stop_words_list: Any = None, return_dict: bool = False, output_generation_logits: bool = False,
                 random_seed: int | None = None, streaming: bool = False, length_penalty: float = 1.0,
                 early_stopping: int = 1):
        if stop_words_list:
            raise PipelineError("generate: stop_words_list is not passed to TensorRT-LLM's runner by this adapter "
                                "(its word-list encoding differs); stop on end_id instead")
        ids = [torch.as_tensor(x, dtype=torch.int32).reshape(-1) for x in batch_input_ids]
        kwargs = dict(max_new_tokens=max_new_tokens, end_id=end_id, pad_id=pad_id, temperature=temperature,
                      top_k=top_k, top_p=top_p, num_beams=num_beams, length_penalty=length_penalty,
                      early_stopping=early_stopping, return_dict=True,
                      output_generation_logits=output_generation_logits, streaming=streaming)
        if random_seed is not None:
            kwargs["random_seed"] = random_seed
        with torch.no_grad():
            outputs = self.runner.generate(ids, **kwargs)
            if streaming:
                return (self._result(o, return_dict) for o in outputs)
            return self._result(outputs, return_dict)

    @staticmethod
    def _result(outputs: dict[str, Any], return_dict: bool):
        result = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in outputs.items()}
        result["output_ids"] = result["output_ids"].long()
        if "sequence_lengths" in result:
            result["sequence_lengths"] = result["sequence_lengths"].long()
        return result if return_dict else result["output_ids"]
