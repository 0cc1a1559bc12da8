"""Beam search over a batch, as tensors: the selection rules of transformers' beam search (which TensorRT-LLM's beam
search kernels follow): per step the best 2 x beams continuations of all running beams by cumulative log
probability; an end token among the best `beams` of them completes a hypothesis scored cum_log_prob /
generated_length ** length_penalty (the end token counted); the best `beams` continuations without an end token run
on. A request is done when `beams` hypotheses are complete (early_stopping 1) or when no running beam can beat the
worst complete one any more (0: at the current length, "never": at the longest possible length when
length_penalty > 0). At the last step every one of the best `beams` continuations completes.

The model side is the caller's: it feeds `tokens` for the rows `[b * beams + k]` after reordering its KV cache rows by
`parents` (rows of the previous step). No Python control flow depends on the data; every request advances together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG = -1.0e9  # transformers' "impossible" score offset; sums of it keep invalid entries ordered as there


def early_stopping_mode(value) -> str:
    """TensorRT-LLM's integer early_stopping (1: stop at `beams` complete hypotheses, 0: heuristic, other: never)
    or transformers' True / False / "never"."""
    if value in ("true", "false", "never"):  # already normalised
        return value
    if value is True or (not isinstance(value, (bool, str)) and value == 1):
        return "true"
    if value is False or (not isinstance(value, (bool, str)) and value == 0):
        return "false"
    if value == "never" or isinstance(value, int):
        return "never"
    raise ValueError(f"early_stopping={value!r}: expected 1, 0, another integer (never), True, False or 'never'")


@dataclass
class BeamResult:
    tokens: torch.Tensor  # [B, K, max_new] generated tokens (end_id after the length)
    lengths: torch.Tensor  # [B, K] generated tokens, the end token not counted
    cum_log_probs: torch.Tensor  # [B, K] sum of the log probabilities of the generated tokens (end token included)
    log_probs: torch.Tensor  # [B, K, max_new] each counted token's log probability, 0 after the length
    scores: torch.Tensor  # [B, K] cum_log_probs / (generated length incl. end token) ** length_penalty


class BeamSearch:
    def __init__(self, batch: int, beams: int, vocab: int, max_new_tokens: int, end_id: int, length_penalty: float,
                 early_stopping):
        self.b, self.k, self.v, self.max_new = batch, beams, vocab, max_new_tokens
        self.end_id, self.lp, self.mode = end_id, float(length_penalty), early_stopping_mode(early_stopping)
        k, n = beams, max_new_tokens
        # Running beams, best first. Only beam 0 is live at the start, so the first step expands one beam.
        self.run_scores = torch.zeros(batch, k)
        self.run_scores[:, 1:] = NEG
        self.run_tokens = torch.full((batch, k, n), end_id, dtype=torch.int64)
        self.run_logp = torch.zeros(batch, k, n)
        # Complete hypotheses, best first.
        self.fin_scores = torch.full((batch, k), NEG)
        self.fin_cum = torch.zeros(batch, k)
        self.fin_tokens = torch.full((batch, k, n), end_id, dtype=torch.int64)
        self.fin_logp = torch.zeros(batch, k, n)
        self.fin_lengths = torch.zeros(batch, k, dtype=torch.int64)
        self.fin_done = torch.zeros(batch, k, dtype=torch.bool)  # slot holds a complete hypothesis
        self.improvable = torch.ones(batch, dtype=torch.bool)  # some running beam may still beat the worst complete
        self.t = 0
        self.top_k_mask = torch.arange(2 * k) < k

    @property
    def done(self) -> torch.Tensor:
        """[B]: requests whose complete hypotheses can no longer change."""
        full = self.fin_done.all(dim=1) & (self.mode == "true")
        return ~self.improvable | full

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B * K, V] float32 of the running beams -> (parents [B, K] beam index within the request, tokens
        [B, K]) of the beams that run on."""
        b, k, v, t = self.b, self.k, self.v, self.t
        logp = torch.log_softmax(logits.float(), dim=-1).view(b, k, v)
        acc = (logp + self.run_scores[:, :, None]).view(b, k * v)
        cand_scores, cand_idx = torch.topk(acc, 2 * k, dim=-1)  # [B, 2K], best first
        cand_beam, cand_tok = cand_idx // v, cand_idx % v
        cand_logp = logp.view(b, k * v).gather(1, cand_idx)
        cand_tokens = self.run_tokens.gather(1, cand_beam[:, :, None].expand(b, 2 * k, self.max_new)).clone()
        cand_tokens[:, :, t] = cand_tok
        cand_token_logp = self.run_logp.gather(1, cand_beam[:, :, None].expand(b, 2 * k, self.max_new)).clone()
        cand_token_logp[:, :, t] = cand_logp
        last = t == self.max_new - 1
        hits = (cand_tok == self.end_id) | torch.full_like(cand_tok, last, dtype=torch.bool)

        # Beams that run on: the best K continuations without an end token.
        running = cand_scores + hits.float() * NEG
        keep = torch.topk(running, k, dim=-1).indices
        parents, tokens = cand_beam.gather(1, keep), cand_tok.gather(1, keep)
        self.run_scores = running.gather(1, keep)
        self.run_tokens = cand_tokens.gather(1, keep[:, :, None].expand(b, k, self.max_new))
        self.run_logp = cand_token_logp.gather(1, keep[:, :, None].expand(b, k, self.max_new))

        self._complete(cand_scores, cand_tokens, cand_token_logp, cand_tok, hits)
        self.t += 1
        self._update_improvable()
        return parents, tokens

    def _complete(self, cand_scores, cand_tokens, cand_token_logp, cand_tok, hits) -> None:
        """Merge continuations that complete now (among the best K) into the complete hypotheses."""
        b, k = self.b, self.k
        gen_len = self.t + 1  # generated tokens including the one chosen now (the end token counts)
        normed = cand_scores / (gen_len ** self.lp)
        full = self.fin_done.all(dim=1, keepdim=True) & (self.mode == "true")
        new = hits & self.top_k_mask[None, :]
        normed = normed + full.float() * NEG + (~self.improvable[:, None]).float() * NEG + (~new).float() * NEG
        ended = cand_tok == self.end_id
        cand_lengths = torch.full_like(cand_tok, gen_len) - ended.long()
        cand_token_logp = torch.where((torch.arange(self.max_new) >= cand_lengths[:, :, None]),
                                      torch.zeros_like(cand_token_logp), cand_token_logp)
        scores = torch.cat([self.fin_scores, normed], dim=1)
        best = torch.topk(scores, k, dim=-1).indices
        pick = lambda old, cand: torch.cat([old, cand], dim=1).gather(  # noqa: E731
            1, best if old.dim() == 2 else best[:, :, None].expand(b, k, old.shape[-1]))
        self.fin_scores = scores.gather(1, best)
        self.fin_cum = pick(self.fin_cum, cand_scores)
        self.fin_tokens = pick(self.fin_tokens, cand_tokens)
        self.fin_logp = pick(self.fin_logp, cand_token_logp)
        self.fin_lengths = pick(self.fin_lengths, cand_lengths)
        self.fin_done = pick(self.fin_done, new)

    def _update_improvable(self) -> None:
        length = self.max_new if (self.mode == "never" and self.lp > 0.0) else self.t
        best_possible = self.run_scores[:, :1] / (length ** self.lp)
        worst = torch.where(self.fin_done, self.fin_scores.min(dim=1, keepdim=True).values, torch.full_like(self.fin_scores, NEG))
        self.improvable &= (best_possible > worst).any(dim=1)

    def running(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The running beams as they stand: tokens [B, K, max_new] and their count (for streaming)."""
        return self.run_tokens, torch.full((self.b, self.k), self.t, dtype=torch.int64)

    def result(self) -> BeamResult:
        return BeamResult(self.fin_tokens, self.fin_lengths, self.fin_cum, self.fin_logp, self.fin_scores)
