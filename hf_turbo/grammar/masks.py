"""Token bitmasks: filled on the CPU in a worker thread while the forward runs, applied on the logits' device.

The engine hands :meth:`MaskFiller.start` the step's constrained rows before it launches the forward and
collects them with :meth:`MaskFiller.collect` when the sampler needs them; ``waits`` counts the steps at
which the masks were not ready yet (the sampler waited). xgrammar fills without the GIL and a CPU forward
spends most of its time in torch ops that release it, so on the CPU too the fill overlaps the forward.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from hf_turbo.grammar.state import GrammarState

__all__ = ["MaskFiller", "apply_masks", "bitmask_width"]


def bitmask_width(vocab_size: int) -> int:
    """int32 words of a bitmask over ``vocab_size`` tokens."""
    return math.ceil(vocab_size / 32)


class MaskFiller:
    """Fills each step's bitmask rows ([rows, ceil(V / 32)] int32 on the CPU) in one background thread."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.width = bitmask_width(vocab_size)
        self.pin = device.type == "cuda"
        self._buf = torch.empty(0, self.width, dtype=torch.int32)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self.fills = 0  # steps with constrained rows
        self.waits = 0  # of those, steps whose masks were not ready when the sampler asked
        self.wait_seconds = 0.0

    def _buffer(self, rows: int) -> torch.Tensor:
        if self._buf.shape[0] < rows:
            size = max(rows, 2 * self._buf.shape[0])
            self._buf = torch.empty(size, self.width, dtype=torch.int32, pin_memory=self.pin)
        return self._buf[:rows]

    def start(self, jobs: Sequence[tuple[GrammarState, int, Sequence[int]]], rows: int) -> None:
        """Begin filling: each job ``(state, first row, proposals)`` fills rows ``first..first + len(proposals)``
        of a ``rows``-row bitmask; other rows allow every token."""
        if self._pending is not None:  # the last step's forward raised before its masks were collected
            self._pending.result()
            self._pending = None
        if not jobs:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-turbo-grammar")
        buf = self._buffer(rows)
        self._pending = self._pool.submit(_fill, buf, list(jobs))

    def collect(self) -> torch.Tensor | None:
        """The bitmask of the last :meth:`start` (None if it had no jobs); waits for the thread if needed.
        Valid until the next ``start``."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        self.fills += 1
        if not pending.done():
            self.waits += 1
            t0 = time.perf_counter()
            out = pending.result()
            self.wait_seconds += time.perf_counter() - t0
            return out
        return pending.result()

    def stats(self) -> dict:
        return {"grammar_mask_steps": self.fills, "grammar_mask_waits": self.waits,
                "grammar_mask_wait_s": self.wait_seconds}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _fill(buf: torch.Tensor, jobs: list[tuple[GrammarState, int, Sequence[int]]]) -> torch.Tensor:
    buf.fill_(-1)
    for state, row, proposals in jobs:
        state.fill(buf, row, proposals)
    return buf


def apply_masks(scores: torch.Tensor, masks: Sequence[torch.Tensor | None]) -> None:
    """Set to -inf, in place, every token a row's mask (int32 [W] on the CPU, or None) leaves out of
    ``scores`` [N, V] float32; one host-to-device copy, xgrammar's kernel on the logits' device."""
    from xgrammar import apply_token_bitmask_inplace

    idx = [i for i, m in enumerate(masks) if m is not None]
    if not idx:
        return
    width = max(masks[i].shape[-1] for i in idx)
    bm = torch.full((scores.shape[0], width), -1, dtype=torch.int32)
    for i in idx:
        bm[i, :masks[i].shape[-1]] = masks[i]
    if scores.device.type != "cpu":
        bm = bm.to(scores.device, non_blocking=True)
    apply_token_bitmask_inplace(scores, bm, indices=idx)
