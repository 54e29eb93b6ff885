"""Incremental detokenisation for streaming: never emits half a UTF-8 character.

Text is decoded from a sliding prefix offset (vLLM's prefix_offset/read_offset scheme), so each
push costs O(new tokens); text ending in U+FFFD is held back until a later token completes it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)

__all__ = ["IncrementalDetokenizer"]


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas that never split a character.

    ``push(new_ids)`` returns the newly stable text; ``finish(final_text)`` returns the rest, so
    that the concatenation of all deltas equals ``final_text``. Each push decodes only the ids from
    ``prefix_offset`` on (a few tokens of left context, so that tokenizers which strip a leading
    space at the start of a decode give the same text as a full decode), which keeps the cost
    O(new tokens) amortized. ``hold_back`` characters stay unreleased until the end (stop strings:
    text the engine may still cut off must not be streamed).
    """

    def __init__(self, tokenizer, hold_back: int = 0, skip_special_tokens: bool = True) -> None:
        if hold_back < 0:
            raise ValueError(f"hold_back must be >= 0, got {hold_back!r}")
        self.tokenizer = tokenizer
        self.hold_back = hold_back
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decode window (left context)
        self.read_offset = 0  # ids before this are turned into stable text
        self._pending = ""  # stable text not released yet (hold_back)
        self._emitted: list[str] = []

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, new_ids: Sequence[int]) -> str:
        """Add token ids; return the text that became stable (possibly "")."""
        self.ids.extend(new_ids)
        if len(self.ids) > self.read_offset:
            prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
            text = self._decode(self.ids[self.prefix_offset:])
            # a trailing U+FFFD is an incomplete UTF-8 sequence that the next token may complete
            if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
                self._pending += text[len(prefix_text):]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        cut = len(self._pending) - self.hold_back
        if cut <= 0:
            return ""
        delta, self._pending = self._pending[:cut], self._pending[cut:]
        self._emitted.append(delta)
        return delta

    def finish(self, final_text: str | None = None, new_ids: Sequence[int] = ()) -> str:
        """The last ids' and held-back text, given the request's final text (default: decode of all ids).

        The final text may end before text that ``push`` would release (a stop string is cut off),
        so the last ids go here rather than through ``push``.
        """
        self.ids.extend(new_ids)
        if final_text is None:
            final_text = self._decode(self.ids)
        emitted = "".join(self._emitted)
        if not final_text.startswith(emitted):
            logger.warning("streamed text is not a prefix of the final text; dropping the remainder")
            return ""
        rest = final_text[len(emitted):]
        self._emitted.append(rest)
        return rest
