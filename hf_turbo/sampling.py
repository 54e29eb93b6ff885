"""Sampling parameters and the sampler: greedy, temperature/top-k/top-p/min-p, repetition penalty.

The processing order and arithmetic follow transformers' logits processors exactly (repetition
penalty, min-new-tokens EOS suppression, then temperature, top-k, top-p, min-p), so greedy output
equals stock ``generate()`` bit for bit on the same logits.

Randomness is keyed, not streamed: the noise for a request's token at position ``p`` comes from a
generator seeded by ``(seed, p)``. A seeded request therefore draws the same tokens whatever else is
in the batch and whichever step computes it, and speculative decoding can re-draw the exact noise
of any position (coupled sampling). Sampling uses the exponential race (Gumbel-max in another
form): ``argmax(p_i / E_i)`` with ``E_i ~ Exp(1)`` is distributed as ``p``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["SamplingParams", "sample", "process_logits", "position_noise"]

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature=0`` is greedy (exact-match with stock generate).

    Every invalid value raises ValueError naming the field.
    """

    max_new_tokens: int = 16
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    speculative: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        if not _is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            bad("min_new_tokens", "must be an integer >= 0")
        if self.min_new_tokens > self.max_new_tokens:
            bad("min_new_tokens", f"must be <= max_new_tokens ({self.max_new_tokens})")
        if not _is_real(self.temperature) or math.isnan(self.temperature) or self.temperature < 0 \
                or math.isinf(self.temperature):
            bad("temperature", "must be a finite number >= 0")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 disables it)")
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            bad("top_p", "must be in (0, 1]")
        if not _is_real(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            bad("min_p", "must be in [0, 1]")
        if not _is_real(self.repetition_penalty) or not (self.repetition_penalty > 0) \
                or math.isinf(self.repetition_penalty):
            bad("repetition_penalty", "must be a finite number > 0")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "must be an integer or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative token ids")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            bad("logprobs", "must be an integer >= 0 or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_history(self) -> bool:
        """Whether the sampler needs the request's token history (repetition penalty)."""
        return self.repetition_penalty != 1.0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class RowState:
    """What the sampler needs to know about one row beyond its params."""

    params: SamplingParams
    position: int  # index of the token being sampled among the request's generated tokens
    seed: int  # the request's seed (a random one drawn at admission when the user gave none)
    history: Sequence[int] | None = None  # prompt + generated ids, for the repetition penalty
    eos_ids: tuple[int, ...] = field(default_factory=tuple)  # suppressed before min_new_tokens


def position_noise(seed: int, position: int, vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Exp(1) noise of length ``vocab`` keyed by ``(seed, position)``: reproducible anywhere."""
    key = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    gen = torch.Generator(device="cpu").manual_seed(key)
    return torch.empty(vocab, dtype=torch.float32).exponential_(generator=gen).to(device)


def random_seed() -> int:
    return random.getrandbits(63)


def process_logits(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """Apply each row's processors in transformers' order. ``logits`` [N, V] float32, modified copy."""
    scores = logits
    # EOS before min_new_tokens, all rows in one write (-inf stays -inf through every later processor,
    # so doing it first equals transformers' order)
    eos = [(i, e) for i, row in enumerate(rows) if row.position < row.params.min_new_tokens for e in row.eos_ids]
    if eos:
        r, c = zip(*eos)
        scores[list(r), list(c)] = -math.inf
    for i, row in enumerate(rows):
        p = row.params
        if p.greedy and p.repetition_penalty == 1.0:
            continue
        if p.repetition_penalty != 1.0 and row.history:
            ids = torch.as_tensor(list(row.history), dtype=torch.long, device=scores.device)
            s = scores[i].gather(0, ids)
            s = torch.where(s < 0, s * p.repetition_penalty, s / p.repetition_penalty)
            scores[i].scatter_(0, ids, s)
        if p.greedy:
            continue
        if p.temperature != 1.0:
            scores[i] = scores[i] / p.temperature
        if p.top_k > 0:
            k = min(p.top_k, scores.shape[-1])
            kth = torch.topk(scores[i], k).values[-1]
            scores[i] = scores[i].masked_fill(scores[i] < kth, -math.inf)
        if p.top_p < 1.0:
            sorted_logits, sorted_idx = torch.sort(scores[i], descending=False)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove = cum <= (1 - p.top_p)
            remove[-1:] = False
            scores[i] = scores[i].masked_fill(remove.scatter(0, sorted_idx, remove), -math.inf)
        if p.min_p > 0.0:
            probs = scores[i].softmax(dim=-1)
            remove = probs < p.min_p * probs.max()
            remove[probs.argmax()] = False
            scores[i] = scores[i].masked_fill(remove, -math.inf)
    return scores


def sample(logits: torch.Tensor, rows: Sequence[RowState], return_scores: bool = False):
    """Pick one token per row. ``logits`` [N, V] (any float dtype). Returns int64 [N] on CPU, and
    with ``return_scores`` also the processed scores [N, V] (what HF's ``output_scores`` holds)."""
    scores = logits.float()
    if any(r.params.repetition_penalty != 1.0 or r.position < r.params.min_new_tokens
           or not r.params.greedy for r in rows):
        scores = process_logits(scores.clone(), rows)
    tokens = scores.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        probs = scores[sampled].softmax(dim=-1)
        noise = torch.stack([position_noise(rows[i].seed, rows[i].position, scores.shape[-1],
                                            scores.device) for i in sampled])
        tokens[sampled] = (probs / noise).argmax(dim=-1)
    return (tokens.cpu(), scores) if return_scores else tokens.cpu()
