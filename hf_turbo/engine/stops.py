"""Incremental stop-string matching: each token scans only its new text plus a short tail window.

The rule it must reproduce exactly (the engine's finish rule): after each output token, the request
stops when ``any(s in tokenizer.decode(output_ids, skip_special_tokens=True) for s in stop)``, and
its final text is that decode cut at each stop string's first occurrence in turn.

Why the incremental form is exact. For a ByteLevel tokenizer (GPT-2, Llama 3, Qwen, the fixture)
the decode is ``lossy_utf8(b(id_1) + ... + b(id_n))``: each id maps to fixed bytes (special ids to
none when skipped) and the bytes are decoded with U+FFFD for invalid or incomplete sequences.
UTF-8 decoding is self-synchronising, so with Python's incremental decoder the text is
``committed + pending`` where ``committed`` only ever grows and ``pending`` is the lossy decode of
at most 3 held bytes (an incomplete character). Since the previous step found no stop string in its
text, of which the old ``committed`` is a prefix, any occurrence now must end inside the new text,
so it lies in the last ``max(len(s)) - 1`` committed characters + the new committed text + pending.
The per-id bytes are derived from the tokenizer's own vocabulary and checked against its decode of
every single id; a tokenizer whose decoder is not ByteLevel, or whose Python ``decode`` post-processes
text (``clean_up_tokenization_spaces``), takes the full-decode path instead (today's cost, same
answer).
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)

__all__ = ["StopStringMatcher", "byte_pieces", "cut_at_stops"]

# every pattern transformers' clean_up_tokenization rewrites: a decode that keeps them all is not cleaned
_CLEANUP_PROBE = "a . b , c ! d ? e ' f n't g 'm h 's i 've j 're k"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which the ByteLevel decoder inverts."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


def byte_pieces(tokenizer, skip_special_tokens: bool = True) -> list[bytes] | None:
    """Per token id, the bytes the tokenizer's decode concatenates; None where decode is not of that form.

    Mirrors the ByteLevel decoder: a token whose characters all come from the byte table gives those
    bytes, any other (added tokens) its UTF-8; skipped special tokens give none. Checked against the
    tokenizer's decode of every single id, and its Python decode against the backend's on text that
    ``clean_up_tokenization_spaces`` would rewrite.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        import json

        decoder = json.loads(backend.to_str()).get("decoder") or {}
        if decoder.get("type") != "ByteLevel":
            return None
        probe = tokenizer.encode(_CLEANUP_PROBE, add_special_tokens=False)
        if tokenizer.decode(probe, skip_special_tokens=skip_special_tokens) != backend.decode(probe):
            return None
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        size = backend.get_vocab_size(with_added_tokens=True)
        pieces = []
        for i in range(size):
            token = backend.id_to_token(i)
            if token is None or (skip_special_tokens and i in special):
                pieces.append(b"")
            elif all(c in _BYTE_OF_CHAR for c in token):
                pieces.append(bytes(_BYTE_OF_CHAR[c] for c in token))
            else:
                pieces.append(token.encode("utf-8"))
        singles = backend.decode_batch([[i] for i in range(size)], skip_special_tokens=skip_special_tokens)
        # added and special ids through the Python decode too: where it could treat them differently
        added = set(backend.get_added_tokens_decoder()) | set(getattr(tokenizer, "all_special_ids", ()))
        python_singles = {i: tokenizer.decode([i], skip_special_tokens=skip_special_tokens)
                          for i in added if 0 <= i < size}
    except Exception as exc:  # an exotic tokenizer: the full decode stays correct
        logger.info("stop strings: full decode per token (%s: %s)", type(exc).__name__, exc)
        return None
    if any(p.decode("utf-8", "replace") != s for p, s in zip(pieces, singles)) \
            or any(pieces[i].decode("utf-8", "replace") != s for i, s in python_singles.items()):
        return None
    return pieces


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` cut at each stop string's first occurrence, in order (the engine's final-text rule)."""
    for s in stops:
        cut = text.find(s)
        if cut >= 0:
            text = text[:cut]
    return text


class StopStringMatcher:
    """One request's stop strings over its growing output ids.

    ``push(token_id)`` after every output token returns whether a stop string now occurs in the
    decode of all output ids; call it until the first True (the request stops there). ``text()`` is
    that decode; ``final_text()`` the text cut at the stops. ``pieces`` from :func:`byte_pieces`
    (computed once per tokenizer); None means the full decode per token.
    """

    def __init__(self, tokenizer, stops: Sequence[str], pieces: list[bytes] | None) -> None:
        if not stops or any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop must be a non-empty list of non-empty strings, got {stops!r}")
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.pieces = pieces
        self.window = max(len(s) for s in self.stops) - 1
        self.ids: list[int] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._committed: list[str] = []
        self._tail = ""  # the last `window` committed characters
        self._pending = ""  # lossy decode of the held bytes of an incomplete character
        self._full: str | None = ""  # full-decode path: the decode of all ids

    @property
    def incremental(self) -> bool:
        return self.pieces is not None

    def push(self, token_id: int) -> bool:
        """Add one output id; True if a stop string occurs in the decode of all ids so far."""
        self.ids.append(token_id)
        if self.pieces is None:
            self._full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            return any(s in self._full for s in self.stops)
        new = self._decoder.decode(self.pieces[token_id] if 0 <= token_id < len(self.pieces) else b"")
        held = self._decoder.getstate()[0]
        self._pending = held.decode("utf-8", "replace") if held else ""
        scan = self._tail + new + self._pending
        if new:
            self._committed.append(new)
            if self.window:
                self._tail = (self._tail + new)[-self.window:]
        return any(s in scan for s in self.stops)

    def text(self) -> str:
        """The decode of all pushed ids (equal to ``tokenizer.decode(ids, skip_special_tokens=True)``)."""
        if self.pieces is None:
            return self._full
        return "".join(self._committed) + self._pending

    def final_text(self) -> str:
        return cut_at_stops(self.text(), self.stops)
