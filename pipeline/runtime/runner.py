"""ModelRunner: load an engine directory (one rank per process) and generate, following TensorRT-LLM's ModelRunner.

Generation is one prefill of the right-padded batch, then one decode step per token. Each sequence keeps its own
positions: its prompt occupies cache positions 0..len-1 and its n-th generated token position len+n-1, so padding
never shifts a sequence and never becomes visible to it. Under mpirun every rank runs the same loop; the last pipeline
stage samples and broadcasts the tokens, so every rank returns identical outputs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from pipeline.checkpoint.safetensors_stream import iter_tensors, read_header
from pipeline.errors import PipelineError
from pipeline.runtime.kernels import choose_kernel
from pipeline.runtime.model import DTYPES, EngineModel, ModelArgs
from pipeline.runtime.parallel import (Dist, broadcast_from_last_stage, init_dist, recv_from_prev_stage,
                                       send_to_next_stage)
from pipeline.runtime.sampling import sample


@dataclass
class _Request:
    input_ids: list[torch.Tensor]
    max_new_tokens: int
    end_id: int
    pad_id: int
    temperature: float
    top_k: int
    top_p: float
    stop_words: list[list[list[int]]]
    output_generation_logits: bool
    generator: torch.Generator | None


def check_engine_format(config_path: Path, config: dict[str, Any]) -> None:
    """An engine directory written by another version of the cpu backend cannot be loaded: say so, not a KeyError."""
    from pipeline.engine.cpu import ENGINE_FORMAT_VERSION

    engine = config.get("engine") if isinstance(config, dict) else None
    if not isinstance(engine, dict) or engine.get("backend") != "cpu":
        raise PipelineError(f"{config_path}: engine.backend is {(engine or {}).get('backend')!r}; this runtime loads "
                            "engines built with build.backend=cpu")
    if engine.get("format_version") != ENGINE_FORMAT_VERSION:
        raise PipelineError(f"{config_path}: engine.format_version={engine.get('format_version')!r}, expected "
                            f"{ENGINE_FORMAT_VERSION}: the engine was built by another version; rebuild it "
                            "(trtllm-pipeline stages=[build] force_stages=[build])")


class ModelRunner:
    def __init__(self, model: EngineModel, dist: Dist, engine_config: dict[str, Any], load_seconds: float):
        self.model = model.eval()
        self.dist = dist
        self.config = engine_config
        self.limits = engine_config["build_config"]
        self.args = model.args
        self.load_seconds = load_seconds

    # -- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, engine_dir: str | Path, rank: int | None = None, kernel: str = "auto") -> "ModelRunner":
        """Load this process's `rank{N}.engine` (N from MPI, or `rank` for a single-rank engine). `kernel` picks
        the linear-layer kernel (`auto`, `torch`, `blas`, `onednn`; see pipeline.runtime.kernels)."""
        started = time.perf_counter()
        engine_dir = Path(engine_dir)
        config_path = engine_dir / "config.json"
        if not config_path.is_file():
            raise PipelineError(f"{engine_dir} is not an engine directory: config.json is missing")
        config = json.loads(config_path.read_text())
        check_engine_format(config_path, config)
        mapping = config["pretrained_config"]["mapping"]
        d = init_dist(mapping["tp_size"], mapping["pp_size"], rank)
        path = engine_dir / f"rank{d.rank}.engine"
        if not path.is_file():
            raise PipelineError(f"{path} is missing (the engine has world_size={mapping['world_size']})")
        meta = json.loads(read_header(path)[0]["__metadata__"]["engine"])
        args = ModelArgs(**meta["model"])
        limits = meta["limits"]
        # Parameters are placeholders (torch.empty touches no memory) replaced by the loaded tensors (assign=True).
        linear = choose_kernel(kernel, DTYPES[args.dtype])
        model = EngineModel(args, d, limits["max_batch_size"], limits["max_seq_len"], linear)
        try:
            missing = model.load_weights(iter_tensors(path))
        except KeyError as e:
            raise PipelineError(f"{path} holds tensor {e.args[0]}, which the runtime model does not have") from None
        if missing:
            raise PipelineError(f"{path} lacks tensors the runtime model needs, e.g. {missing[:3]}")
        return cls(model, d, config, time.perf_counter() - started)

    # -- public API ------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    def generate(self, batch_input_ids: Sequence[torch.Tensor], max_new_tokens: int, end_id: int, pad_id: int,
                 temperature: float = 1.0, top_k: int = 1, top_p: float = 0.0, num_beams: int = 1,
                 stop_words_list: Any = None, return_dict: bool = False, output_generation_logits: bool = False,
                 random_seed: int | None = None, streaming: bool = False):
        """Generate for a batch of 1-D token tensors of different lengths.

        Returns `output_ids` [batch, beams, max_len]: each row is that sequence's prompt, then its generated tokens,
        padded with `end_id` (the end token itself is not counted in `sequence_lengths`). With `return_dict=True`: a
        dict with `output_ids`, `sequence_lengths` [batch, beams], `context_logits` (padded [batch, max_input_len,
        vocab], engines built with gather_context_logits) and `generation_logits` ([batch, beams, max_new_tokens,
        vocab], when asked for). `stop_words_list`: one list of token-id sequences for every sequence, or one such
        list per sequence. With `streaming=True` an iterator yields the same structure after every step.
        """
        request = self._check(batch_input_ids, max_new_tokens, end_id, pad_id, temperature, top_k, top_p, num_beams,
                              stop_words_list, output_generation_logits, random_seed)
        steps = self._steps(request, return_dict)
        if streaming:
            return steps
        result = None
        for result in steps:
            pass
        return result

    # -- validation ------------------------------------------------------------------------------------------
    def _check(self, batch, max_new_tokens, end_id, pad_id, temperature, top_k, top_p, num_beams, stop_words,
               output_generation_logits, random_seed) -> _Request:
        lim = self.limits
        ids = [torch.as_tensor(x, dtype=torch.int64).reshape(-1) for x in batch]
        problems = []
        if not ids:
            problems.append("batch_input_ids is empty")
        if len(ids) > lim["max_batch_size"]:
            problems.append(f"batch of {len(ids)} exceeds max_batch_size={lim['max_batch_size']}")
        if num_beams != 1 or num_beams > lim["max_beam_width"]:
            problems.append(f"num_beams={num_beams}: this engine does beam width 1 only (max_beam_width={lim['max_beam_width']})")
        if max_new_tokens < 1:
            problems.append(f"max_new_tokens={max_new_tokens} must be >= 1")
        for i, x in enumerate(ids):
            if x.numel() == 0:
                problems.append(f"sequence {i} is empty")
            elif x.numel() > lim["max_input_len"]:
                problems.append(f"sequence {i} has {x.numel()} tokens, more than max_input_len={lim['max_input_len']}")
            elif x.numel() + max_new_tokens > lim["max_seq_len"]:
                problems.append(f"sequence {i}: {x.numel()} input + {max_new_tokens} new tokens exceed max_seq_len={lim['max_seq_len']}")
            elif int(x.min()) < 0 or int(x.max()) >= self.vocab_size:
                problems.append(f"sequence {i} has token ids outside [0, {self.vocab_size})")
        if output_generation_logits and not lim["gather_generation_logits"]:
            problems.append("output_generation_logits needs an engine built with gather_generation_logits=true")
        if temperature < 0 or top_k < 0 or not 0.0 <= top_p <= 1.0:
            problems.append(f"invalid sampling settings temperature={temperature} top_k={top_k} top_p={top_p}")
        if problems:
            raise PipelineError("generate: " + "; ".join(problems))
        generator = torch.Generator().manual_seed(random_seed) if random_seed is not None else None
        return _Request(ids, max_new_tokens, end_id, pad_id, temperature, top_k, top_p,
                        _normalise_stop_words(stop_words, len(ids)), output_generation_logits, generator)

    # -- the loop --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _steps(self, r: _Request, return_dict: bool) -> Iterator[Any]:
        b = len(r.input_ids)
        lengths = torch.tensor([x.numel() for x in r.input_ids])
        width = int(lengths.max())
        tokens = torch.full((b, width), r.pad_id, dtype=torch.int64)
        for i, x in enumerate(r.input_ids):
            tokens[i, : x.numel()] = x
        out = torch.full((b, 1, width + r.max_new_tokens), r.end_id, dtype=torch.int64)
        for i, x in enumerate(r.input_ids):
            out[i, 0, : x.numel()] = x
        seq_lengths = lengths.clone()
        finished = torch.zeros(b, dtype=torch.bool)
        gen_logits = [] if r.output_generation_logits else None

        context_logits, last_logits = self._prefill(tokens, lengths)
        # Finished sequences are fed a harmless in-vocabulary token (the end id may be -1 or out of range).
        filler = r.pad_id if 0 <= r.pad_id < self.vocab_size else 0
        for step in range(r.max_new_tokens):
            next_tokens = self._sample_and_share(last_logits, r)
            if gen_logits is not None:
                gen_logits.append(last_logits)
            active = ~finished
            hit_end = active & (next_tokens == r.end_id)
            append = active & ~hit_end
            for i in torch.nonzero(append).flatten().tolist():
                out[i, 0, seq_lengths[i]] = next_tokens[i]
            seq_lengths += append.long()
            finished |= hit_end | self._stopped(out, seq_lengths, lengths, r.stop_words)
            done = bool(finished.all()) or step == r.max_new_tokens - 1
            yield self._result(out, seq_lengths, context_logits, gen_logits, return_dict, r, final=done)
            if done:
                return
            # The token just appended sits at position length-1; finished sequences stay at a frozen position (their
            # output is final, what they compute is discarded) so the batch keeps its shape.
            positions = (seq_lengths - 1).unsqueeze(1)
            feed = torch.where(finished, torch.full_like(next_tokens, filler), next_tokens)
            last_logits = self._forward(feed.unsqueeze(1), positions, int(positions.max()) + 1)[:, 0]

    def _prefill(self, tokens: torch.Tensor, lengths: torch.Tensor):
        b, width = tokens.shape
        chunk = max(1, self.limits["max_num_tokens"] // width)  # sequences per prefill pass within max_num_tokens
        positions = torch.arange(width).expand(b, width)
        last, context = [], []
        gather_context = self.limits["gather_context_logits"]
        for start in range(0, b, chunk):
            sl = slice(start, start + chunk)
            logits = self._forward(tokens[sl], positions[sl], width, lengths=lengths[sl], all_positions=gather_context,
                                   batch_offset=start)
            if gather_context:
                context.append(logits)
                last.append(logits[torch.arange(logits.shape[0]), lengths[sl] - 1])
            else:
                last.append(logits[:, 0])
        return (torch.cat(context) if gather_context else None), torch.cat(last)

    def _forward(self, x: torch.Tensor, positions: torch.Tensor, kv_len: int, lengths: torch.Tensor | None = None,
                 all_positions: bool = False, batch_offset: int = 0) -> torch.Tensor:
        """Run this rank's stage and return float32 logits on every rank: [B, T, V] for all positions, or [B, 1, V]
        for each sequence's last position (`lengths`) or the only one (decode)."""
        d, m = self.dist, self.model
        b, t = positions.shape
        if batch_offset:  # prefill chunks beyond the first use their own cache rows
            return self._forward_rows(x, positions, kv_len, lengths, all_positions, batch_offset)
        h_in = x if d.is_first_stage else recv_from_prev_stage((b, t, self.args.hidden_size), DTYPES[self.args.dtype], d)
        h = m.step(h_in, positions, kv_len)
        n = t if all_positions else 1
        if not d.is_last_stage:
            send_to_next_stage(h, d)
            logits = torch.empty(b, n, self.args.vocab_size)
        elif all_positions:
            logits = m.logits(h)
        else:
            idx = (lengths - 1) if lengths is not None else torch.zeros(b, dtype=torch.long)
            logits = m.logits(h[torch.arange(b), idx].unsqueeze(1))
        return broadcast_from_last_stage(logits.contiguous(), d)

    def _forward_rows(self, x, positions, kv_len, lengths, all_positions, offset):
        """Prefill of batch rows [offset, offset+B): the caches are temporarily viewed from that row on."""
        saved = [(c.k, c.v) for c in self.model.caches]
        try:
            for c in self.model.caches:
                c.k, c.v = c.k[offset:], c.v[offset:]
            return self._forward(x, positions, kv_len, lengths, all_positions, 0)
        finally:
            for c, (k, v) in zip(self.model.caches, saved):
                c.k, c.v = k, v

    def _sample_and_share(self, logits: torch.Tensor, r: _Request) -> torch.Tensor:
        tokens = sample(logits, r.temperature, r.top_k, r.top_p, r.generator)
        return broadcast_from_last_stage(tokens, self.dist)

    @staticmethod
    def _stopped(out, seq_lengths, input_lengths, stop_words) -> torch.Tensor:
        stopped = torch.zeros(len(seq_lengths), dtype=torch.bool)
        for i, words in enumerate(stop_words):
            generated = out[i, 0, input_lengths[i]: seq_lengths[i]].tolist()
            stopped[i] = any(len(w) <= len(generated) and generated[len(generated) - len(w):] == w for w in words)
        return stopped

    def _result(self, out, seq_lengths, context_logits, gen_logits, return_dict, r: _Request, final: bool):
        width = int(seq_lengths.max()) if not final else out.shape[-1]
        output_ids = out[:, :, :width].clone()
        if not return_dict:
            return output_ids
        result = {"output_ids": output_ids, "sequence_lengths": seq_lengths.clone().unsqueeze(1)}
        if context_logits is not None:
            result["context_logits"] = context_logits
        if gen_logits is not None:
            result["generation_logits"] = torch.stack(gen_logits, dim=1).unsqueeze(1)
        return result


def _normalise_stop_words(stop_words: Any, batch: int) -> list[list[list[int]]]:
    """Accept None, one list of token-id sequences for all, or one such list per sequence."""
    if not stop_words:
        return [[] for _ in range(batch)]
    if all(isinstance(w, (list, tuple)) and w and all(isinstance(t, int) for t in w) for w in stop_words):
        return [[list(w) for w in stop_words] for _ in range(batch)]
    if len(stop_words) != batch:
        raise PipelineError(f"generate: stop_words_list has {len(stop_words)} entries for a batch of {batch}")
    return [[list(w) for w in words] for words in stop_words]
