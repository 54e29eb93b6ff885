"""The engine's side of structured output: a grammar per constrained request, each step's masks.

``attach`` gives a request its :class:`GrammarState` at admission (compiling through the cache);
``start`` hands the step's constrained rows to the :class:`MaskFiller` just before the forward and
``apply`` puts each row's mask on its ``RowState`` after it. The state itself advances in the
engine's bookkeeping, on accepted tokens only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from hf_turbo.grammar.compiler import GrammarCompilerCache, compiled_for, spec_of
from hf_turbo.grammar.masks import MaskFiller
from hf_turbo.grammar.state import GrammarState

__all__ = ["StepGrammar"]


class StepGrammar:
    """Grammars for one Engine: its compiler cache (built on first use) and its mask filler."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int], device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
        self.filler = MaskFiller(vocab_size, device)
        self._rows: list[int] = []  # the constrained rows of the step being filled

    @functools.cached_property
    def compiler(self) -> GrammarCompilerCache:
        """The compiled-grammar cache for this engine's tokenizer (thread-safe: the server compiles here)."""
        return GrammarCompilerCache(self.tokenizer, self.vocab_size, self.stop_token_ids)

    def state_for(self, params) -> GrammarState | None:
        """A fresh matcher for ``params``'s grammar (None when unconstrained); ValueError naming the field."""
        spec = spec_of(params)
        if spec is None:
            return None
        if type(spec[1]).__name__ == "CompiledGrammar":  # compiled by the caller (generate()'s processor)
            return GrammarState(compiled_for(spec[1], self.vocab_size))
        return GrammarState(self.compiler.compile(*spec))

    def start(self, plan) -> None:
        """Start filling the masks of the plan's constrained rows (a ``StepPlan``: ``sampled`` and ``rows``)."""
        jobs, row, self._rows = [], 0, []
        for i, req in plan.sampled:
            n = len(plan.rows[i])
            if req.grammar is not None:
                jobs.append((req.grammar, row, list(req.spec_tokens)))
                self._rows.extend(range(row, row + n))
            row += n
        self.filler.start(jobs, row)

    def apply(self, states: list) -> list:
        """Set each constrained row's ``mask`` on the step's ``RowState``s (logits order); waits for the
        filler if it is not done."""
        masks = self.filler.collect()
        if masks is not None:
            for r in self._rows:
                states[r].mask = masks[r]
        return states

    def stats(self) -> dict:
        return self.filler.stats()

    def close(self) -> None:
        self.filler.close()
