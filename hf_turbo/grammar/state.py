"""One request's grammar state: an xgrammar matcher advanced only by accepted tokens.

A verify step under speculation samples rows ``0..k`` of a request, row ``j`` after its proposals
``d_1..d_j``; :meth:`GrammarState.fill` advances the matcher tentatively through them, fills each row's
mask and rolls back, so rejected proposals never advance the state. Semantics follow xgrammar's own
transformers processor: once the matcher has accepted a stop token it is terminated, and later rows
keep the mask filled before that token (the processor leaves its bitmask row as it was).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_turbo.grammar.compiler import require_xgrammar

__all__ = ["GrammarState"]


class GrammarState:
    """The matcher of one request's compiled grammar (``xgrammar.CompiledGrammar``)."""

    def __init__(self, compiled) -> None:
        xgr = require_xgrammar()
        self.matcher = xgr.GrammarMatcher(compiled)
        # words of the grammar's own vocabulary; a wider model vocabulary stays unmasked past it, as the
        # processor's bitmask leaves it
        self.width = xgr.get_bitmask_shape(1, compiled.tokenizer_info.vocab_size)[1]
        self.final_mask: torch.Tensor | None = None  # the mask before the stop token, once terminated
        self.rejected = False  # a token outside the grammar was emitted (every token was masked)

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()

    def accept(self, token: int) -> bool:
        """Advance by one emitted token; False (and ``rejected``) if the grammar does not allow it."""
        m = self.matcher
        if m.is_terminated():
            return True
        if not m.accept_token(token):
            self.rejected = True
            return False
        if m.is_terminated():  # keep the mask filled before the stop token (xgrammar's processor does)
            m.rollback(1)
            self.final_mask = torch.empty((1, self.width), dtype=torch.int32)
            m.fill_next_token_bitmask(self.final_mask, 0)
            m.accept_token(token)
        return True

    def fill(self, bitmask: torch.Tensor, row: int, proposals: Sequence[int] = ()) -> None:
        """Fill ``bitmask[row + j]`` (int32 [R, W], CPU) for ``j = 0..len(proposals)``: the mask after the
        accepted tokens and ``proposals[:j]``. The matcher ends where it started."""
        m = self.matcher
        bitmask = bitmask[:, :self.width]
        self._fill_row(bitmask, row)
        advanced = 0
        for j, tok in enumerate(proposals, start=1):
            if m.is_terminated() or not m.accept_token(tok):
                # rows past a proposal the grammar refuses are never emitted: the target's constrained
                # choice before it differs from it, so verification stops there
                bitmask[row + j:row + len(proposals) + 1] = bitmask[row + j - 1]
                break
            advanced += 1
            if m.is_terminated():
                bitmask[row + j] = bitmask[row + j - 1]
            else:
                m.fill_next_token_bitmask(bitmask, row + j)
        if advanced:
            m.rollback(advanced)

    def _fill_row(self, bitmask: torch.Tensor, row: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.fill_next_token_bitmask(bitmask, row)
        elif self.final_mask is not None:
            bitmask[row] = self.final_mask[0]
        else:
            bitmask[row] = -1

