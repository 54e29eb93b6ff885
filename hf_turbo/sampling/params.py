"""``SamplingParams`` (validated, ValueError naming the field) and ``RowState`` (one row the sampler sees)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["SamplingParams", "RowState", "random_seed", "validate_vocab"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature=0`` is greedy (exact-match with stock generate).

    ``presence_penalty`` / ``frequency_penalty`` follow OpenAI: a token already in the generated output
    loses ``presence_penalty`` once plus ``frequency_penalty`` per occurrence; ``logit_bias`` maps token
    ids to a value added to their logits. Every invalid value raises ValueError naming the field.

    Structured output (at most one, through xgrammar; ``hf_turbo.grammar``): ``json_schema`` (a dict or its
    JSON text), ``regex``, ``grammar`` (EBNF text, or an ``xgrammar.CompiledGrammar``) or ``choices`` (the
    output is one of these strings). ``n``: samples of the prompt (``Engine.generate`` and the server run
    them as ``n`` requests sharing the prompt's KV blocks; sample ``i`` has seed ``seed + i``).
    """

    max_new_tokens: int = 16
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    speculative: bool = True
    json_schema: dict | str | None = None
    regex: str | None = None
    grammar: Any = None
    choices: tuple[str, ...] | None = None
    n: int = 1

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
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
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
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_real(getattr(self, name)) or not (-2.0 <= getattr(self, name) <= 2.0):
                bad(name, "must be a number in [-2, 2]")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", "must be a dict of token id -> bias")
            for tok, bias in self.logit_bias.items():
                if not _is_int(tok) or tok < 0:
                    bad("logit_bias", f"keys must be token ids >= 0 (key {tok!r})")
                if not _is_real(bias) or not (-100.0 <= bias <= 100.0):
                    bad("logit_bias", f"values must be numbers in [-100, 100] (token {tok}: {bias!r})")
            # a private copy: the caller's dict may change after validation
            object.__setattr__(self, "logit_bias", {int(t): float(b) for t, b in self.logit_bias.items()} or None)
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "must be an integer or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative token ids")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            bad("logprobs", "must be an integer >= 0 or None")
        if not _is_int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1")
        self._check_grammar(bad)

    def _check_grammar(self, bad: Callable[[str, str], None]) -> None:
        given = [name for name in ("json_schema", "regex", "grammar", "choices") if getattr(self, name) is not None]
        if len(given) > 1:
            bad(given[1], f"cannot be combined with {given[0]}: give at most one of json_schema, regex, grammar, "
                          "choices")
        if self.json_schema is not None:
            if not isinstance(self.json_schema, (dict, str)):
                bad("json_schema", "must be a dict or its JSON text")
            try:  # a private copy, and a JSON value
                text = self.json_schema if isinstance(self.json_schema, str) else json.dumps(self.json_schema)
                copy = json.loads(text)
            except (TypeError, ValueError) as exc:
                bad("json_schema", f"is not JSON ({exc})")
            if not isinstance(copy, dict):
                bad("json_schema", "must be a JSON object")
            object.__setattr__(self, "json_schema", copy)
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            bad("regex", "must be a non-empty string")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()) \
                and type(self.grammar).__name__ != "CompiledGrammar":
            bad("grammar", "must be EBNF text or an xgrammar.CompiledGrammar")
        if self.choices is not None:
            if isinstance(self.choices, str) or not isinstance(self.choices, (list, tuple)) or not self.choices \
                    or any(not isinstance(c, str) or not c for c in self.choices):
                bad("choices", "must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choices", tuple(self.choices))

    __hash__ = None  # logit_bias is a dict

    def samples(self) -> list[SamplingParams]:
        """The ``n`` single samples of this request: sample ``i`` has seed ``seed + i`` (each drawn at random
        when ``seed`` is None), so each equals the same request sent alone with that seed."""
        if self.n == 1:
            return [self]
        return [dataclasses.replace(self, n=1, seed=None if self.seed is None else self.seed + i)
                for i in range(self.n)]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_history(self) -> bool:
        """Whether the sampler needs the request's token history (repetition/presence/frequency penalty)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def constrained(self) -> bool:
        """Whether the output follows a grammar (json_schema, regex, grammar or choices)."""
        return any(getattr(self, f) is not None for f in ("json_schema", "regex", "grammar", "choices"))

    @property
    def has_filters(self) -> bool:
        """Whether a sampled row is cut down by top-k, top-p or min-p."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


def validate_vocab(params: SamplingParams, vocab_size: int) -> None:
    """ValueError naming ``logit_bias`` when it holds a token id outside ``[0, vocab_size)``."""
    bad = [t for t in (params.logit_bias or ()) if t >= vocab_size]
    if bad:
        raise ValueError(f"SamplingParams.logit_bias has token id {bad[0]} outside the vocabulary [0, {vocab_size})")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def random_seed() -> int:
    return random.getrandbits(63)


@dataclass
class RowState:
    """What the sampler needs to know about one row beyond its params."""

    params: SamplingParams
    position: int  # index of the token being sampled among the request's generated tokens
    seed: int  # the request's seed (a random one drawn at admission when the user gave none)
    # prompt + generated ids (the repetition penalty's input); its last ``position`` ids are the generated
    # output (presence/frequency penalties)
    history: Sequence[int] | None = None
    eos_ids: tuple[int, ...] = field(default_factory=tuple)  # suppressed before min_new_tokens
    # generate()'s extra HF processors: scores [1, V] float32 -> scores, after the penalties and the EOS
    # suppression, before temperature and the filters (greedy rows too)
    hook: Callable[[torch.Tensor], torch.Tensor] | None = None
    # the row's grammar bitmask (int32 [ceil(V / 32)], CPU; bit 0: the token is not allowed), applied after
    # the hook and before temperature, as xgrammar's transformers processor sits in stock generate()
    mask: torch.Tensor | None = None
