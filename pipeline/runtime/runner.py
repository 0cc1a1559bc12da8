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
from pipeline.runtime.beam_search import BeamSearch, early_stopping_mode
from pipeline.runtime.kernels import choose_kernel
from pipeline.runtime.model import DTYPES, EngineModel, ModelArgs
from pipeline.runtime.parallel import (Dist, broadcast_from_last_stage, init_dist, recv_from_prev_stage,
                                       send_to_next_stage)
from pipeline.runtime.sampling import is_greedy, sample


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
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: Any = 1
    output_log_probs: bool = False
    output_cum_log_probs: bool = False


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
        backend = config.get("engine", {}).get("backend", "cpu")
        if backend == "trtllm":  # TensorRT-LLM's own runtime runs its engines
            from pipeline.runtime.trtllm_runner import TrtllmRunner

            return TrtllmRunner.from_dir(engine_dir, config, rank)
        if backend == "cpu":
            check_engine_format(config_path, config)
        mapping = config["pretrained_config"]["mapping"]
        d = init_dist(mapping["tp_size"], mapping["pp_size"], rank)
        if backend != "cpu":  # exported graphs (onnx, tensorrt) behind the same stage-model contract
            from pipeline.runtime.exported import load_graph_model

            return cls(load_graph_model(backend, engine_dir, d, config), d, config, time.perf_counter() - started)
        path = engine_dir / f"rank{d.rank}.engine"
        if not path.is_file():
            raise PipelineError(f"{path} is missing (the engine has world_size={mapping['world_size']})")
        meta = json.loads(read_header(path)[0]["__metadata__"]["engine"])
        args = ModelArgs(**meta["model"])
        limits = meta["limits"]
        # Parameters are placeholders (torch.empty touches no memory) replaced by the loaded tensors (assign=True).
        # The KV cache holds a row per beam of every request (lazily resident: rows cost memory once written).
        linear = choose_kernel(kernel, DTYPES[args.dtype])
        rows = limits["max_batch_size"] * limits.get("max_beam_width", 1)
        model = EngineModel(args, d, rows, limits["max_seq_len"], linear, limits["max_input_len"])
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
                 random_seed: int | None = None, streaming: bool = False, length_penalty: float = 1.0,
                 early_stopping: Any = 1, output_cum_log_probs: bool = False, output_log_probs: bool = False):
        """Generate for a batch of 1-D token tensors of different lengths.

        Returns `output_ids` [batch, beams, max_len]: each row is that sequence's prompt, then its generated tokens,
        padded with `end_id` (the end token itself is not counted in `sequence_lengths`). With `return_dict=True`: a
        dict with `output_ids`, `sequence_lengths` [batch, beams], `context_logits` (padded [batch, max_input_len,
        vocab], engines built with gather_context_logits) and `generation_logits` ([batch, beams, max_new_tokens,
        vocab], when asked for). `stop_words_list`: one list of token-id sequences for every sequence, or one such
        list per sequence. With `streaming=True` an iterator yields the same structure after every step.

        `num_beams > 1` (up to the engine's max_beam_width) runs beam search: the beams of each request, best first
        (`length_penalty`, `early_stopping`: 1 stops at num_beams complete hypotheses, 0 when none can improve, other
        values never before that is certain; see pipeline.runtime.beam_search). `output_cum_log_probs` adds
        `cum_log_probs` [batch, beams] (sum of the generated tokens' log probabilities, the end token included),
        `output_log_probs` adds `log_probs` [batch, beams, max_new_tokens] (each counted token's, 0 after).
        """
        request = self._check(batch_input_ids, max_new_tokens, end_id, pad_id, temperature, top_k, top_p, num_beams,
                              stop_words_list, output_generation_logits, random_seed)
        request.length_penalty, request.output_log_probs = float(length_penalty), output_log_probs
        request.output_cum_log_probs = output_cum_log_probs
        try:
            request.early_stopping = early_stopping_mode(early_stopping)
        except ValueError as e:
            raise PipelineError(f"generate: {e}") from None
        steps = self._beam_steps(request, return_dict) if num_beams > 1 else self._steps(request, return_dict)
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
        if not 1 <= num_beams <= lim["max_beam_width"]:
            problems.append(f"num_beams={num_beams} must be in [1, max_beam_width={lim['max_beam_width']}] (the "
                            f"engine's build.max_beam_width)")
        elif num_beams > 1:
            if stop_words:
                problems.append("stop_words_list with num_beams > 1 is not supported")
            if output_generation_logits:
                problems.append("output_generation_logits with num_beams > 1 is not supported")
            if temperature not in (0.0, 1.0):
                problems.append(f"temperature={temperature} with num_beams > 1 (beam sampling) is not supported")
            if num_beams > self.vocab_size // 2:
                problems.append(f"num_beams={num_beams} needs a vocabulary of at least 2 x num_beams tokens")
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
                        _normalise_stop_words(stop_words, len(ids)), output_generation_logits, generator, num_beams)

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
        log_probs = torch.zeros(b, 1, r.max_new_tokens)

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
            rows = torch.nonzero(append).flatten()  # one indexed write for the batch, not one per sequence
            out[rows, 0, seq_lengths[rows]] = next_tokens[rows]
            if r.output_log_probs or r.output_cum_log_probs:
                log_probs[:, 0, step] = torch.where(active, self._token_log_probs(last_logits, next_tokens, r), 0.0)
            seq_lengths += append.long()
            finished |= hit_end | self._stopped(out, seq_lengths, lengths, r.stop_words)
            done = bool(finished.all()) or step == r.max_new_tokens - 1
            yield self._result(out, seq_lengths, context_logits, gen_logits, return_dict, r, final=done,
                               log_probs=log_probs, counted=seq_lengths - lengths)
            if done:
                return
            # The token just appended sits at position length-1; finished sequences stay at a frozen position (their
            # output is final, what they compute is discarded) so the batch keeps its shape.
            positions = (seq_lengths - 1).unsqueeze(1)
            feed = torch.where(finished, torch.full_like(next_tokens, filler), next_tokens)
            last_logits = self._forward(feed.unsqueeze(1), positions, int(positions.max()) + 1)[:, 0]

    @torch.inference_mode()
    def _beam_steps(self, r: _Request, return_dict: bool) -> Iterator[Any]:
        """Beam search: one prefill per prompt, its KV cache rows copied to the request's beams (row b * K + k), then
        one decode step for all B * K beams per token. After each step the beams that run on take their parents'
        cache rows (a gather of the rows that changed, over the generated positions only)."""
        b, k = len(r.input_ids), r.num_beams
        lengths = torch.tensor([x.numel() for x in r.input_ids])
        width = int(lengths.max())
        tokens = torch.full((b, width), r.pad_id, dtype=torch.int64)
        for i, x in enumerate(r.input_ids):
            tokens[i, : x.numel()] = x
        context_logits, last_logits = self._prefill(tokens, lengths)
        self._expand_cache_rows(b, k, width)
        search = BeamSearch(b, k, self.vocab_size, r.max_new_tokens, r.end_id, r.length_penalty, r.early_stopping)
        logits = last_logits.repeat_interleave(k, dim=0)  # every beam of a request starts from its prompt
        beam_lengths = lengths.repeat_interleave(k)  # [B * K]: the prompt's length, then one more per step
        first_row = torch.arange(b).unsqueeze(1) * k
        for step in range(r.max_new_tokens):
            parents, next_tokens = search.step(logits)
            done = bool(search.done.all()) or step == r.max_new_tokens - 1
            if done:
                yield self._beam_result(search.result(), lengths, r, context_logits, return_dict, final=True)
                return
            yield self._beam_result(search, lengths, r, context_logits, return_dict, final=False)
            # Rows b*K + parent -> b*K + k; positions already generated (the prompt is the same for all beams).
            if step:  # before the first step every beam of a request holds the same rows
                self._reorder_cache_rows((first_row + parents).flatten(), int(lengths.min()), width + step)
            positions = (beam_lengths + step).unsqueeze(1)
            logits = self._forward(next_tokens.reshape(-1, 1), positions, int(positions.max()) + 1)[:, 0]

    def _expand_cache_rows(self, batch: int, beams: int, width: int) -> None:
        """Copy each prompt's cache row (rows [0, batch) after prefill) to its beams' rows [b * beams + k]."""
        rows = torch.arange(batch).repeat_interleave(beams)
        for c in self.model.caches:
            c.reorder_rows(rows, torch.arange(batch * beams), 0, width)

    def _reorder_cache_rows(self, src: torch.Tensor, start: int, end: int) -> None:
        changed = torch.nonzero(src != torch.arange(len(src))).flatten()
        for c in self.model.caches:
            c.reorder_rows(src[changed], changed, start, end)

    def _beam_result(self, state, lengths: torch.Tensor, r: _Request, context_logits, return_dict: bool,
                     final: bool):
        """Outputs of beam search: the complete hypotheses best first (final), else the running beams as they stand."""
        if final:
            gen, counted, log_probs, cum = state.tokens, state.lengths, state.log_probs, state.cum_log_probs
        else:
            (gen, counted), log_probs, cum = state.running(), state.run_logp, state.run_scores
        b, k = counted.shape
        width = int(lengths.max())
        out = torch.full((b, k, width + r.max_new_tokens), r.end_id, dtype=torch.int64)
        for i, x in enumerate(r.input_ids):
            n = x.numel()
            out[i, :, :n] = x
            out[i, :, n: n + r.max_new_tokens] = gen[i]
        # Tokens beyond each beam's length are end ids already (gen is end_id-padded).
        seq_lengths = lengths[:, None] + counted
        return self._result(out, seq_lengths, context_logits, None, return_dict, r, final, log_probs=log_probs,
                            counted=counted, cum_log_probs=cum)

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
        elif lengths is None:  # decode: the only position
            logits = m.logits(h[:, -1:])
        else:
            logits = m.logits(h[torch.arange(b), lengths - 1].unsqueeze(1))
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
            if not words:  # the request's settings: nothing to compare (and no copy of the tokens per step)
                continue
            generated = out[i, 0, input_lengths[i]: seq_lengths[i]].tolist()
            stopped[i] = any(len(w) <= len(generated) and generated[len(generated) - len(w):] == w for w in words)
        return stopped

    def _result(self, out, seq_lengths, context_logits, gen_logits, return_dict, r: _Request, final: bool,
                log_probs: torch.Tensor | None = None, counted: torch.Tensor | None = None,
                cum_log_probs: torch.Tensor | None = None):
        """out [B, beams, W]; seq_lengths [B] or [B, beams]; log_probs [B, beams, max_new]: each generated token's,
        of which the first `counted` ([B] or [B, beams]) are reported; cum_log_probs [B, beams] (else their sum)."""
        width = int(seq_lengths.max()) if not final else out.shape[-1]
        output_ids = out[:, :, :width].clone()
        if not return_dict:
            return output_ids
        seq_lengths = seq_lengths if seq_lengths.dim() == 2 else seq_lengths.unsqueeze(1)
        result = {"output_ids": output_ids, "sequence_lengths": seq_lengths.clone()}
        if context_logits is not None:
            result["context_logits"] = context_logits
        if gen_logits is not None:
            result["generation_logits"] = torch.stack(gen_logits, dim=1).unsqueeze(1)
        if r.output_log_probs or r.output_cum_log_probs:
            counted = counted if counted.dim() == 2 else counted.unsqueeze(1)
            shown = torch.where(torch.arange(log_probs.shape[-1]) < counted[:, :, None], log_probs, 0.0)
            if r.output_log_probs:
                result["log_probs"] = shown
            if r.output_cum_log_probs:
                result["cum_log_probs"] = cum_log_probs if cum_log_probs is not None else log_probs.sum(-1)
        return result

    @staticmethod
    def _token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, r: _Request) -> torch.Tensor:
        """Log probability of each chosen token under the distribution it was chosen from (temperature applied
        when sampling)."""
        scaled = logits if is_greedy(r.temperature, r.top_k, r.top_p) else logits / r.temperature
        return torch.log_softmax(scaled, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)


def _normalise_stop_words(stop_words: Any, batch: int) -> list[list[list[int]]]:
    """Accept None, one list of token-id sequences for all, or one such list per sequence."""
    if not stop_words:
        return [[] for _ in range(batch)]
    if all(isinstance(w, (list, tuple)) and w and all(isinstance(t, int) for t in w) for w in stop_words):
        return [[list(w) for w in stop_words] for _ in range(batch)]
    if len(stop_words) != batch:
        raise PipelineError(f"generate: stop_words_list has {len(stop_words)} entries for a batch of {batch}")
    return [[list(w) for w in words] for words in stop_words]
