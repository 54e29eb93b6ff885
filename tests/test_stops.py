"""Incremental stop strings: the same finishing step and text as the full decode, without decoding it."""

from __future__ import annotations

import copy
import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_turbo
from hf_turbo import Engine, SamplingParams
from hf_turbo.engine.stops import StopStringMatcher, byte_pieces, cut_at_stops
from hf_turbo.testing import fixture_path, tiny_model


@functools.cache
def _tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fixture_path("target"))


@functools.cache
def _pieces():
    return byte_pieces(_tok())


def _full_rule(tok, ids: list[int], stops: list[str]) -> tuple[int, str]:
    """The engine's old rule: the first prefix whose full decode holds a stop string, and its cut text."""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n], skip_special_tokens=True)
        if any(s in text for s in stops):
            return n, cut_at_stops(text, stops)
    return len(ids), cut_at_stops(tok.decode(ids, skip_special_tokens=True), stops)


def _run(matcher: StopStringMatcher, ids: list[int]) -> tuple[int, str]:
    for n, t in enumerate(ids, 1):
        if matcher.push(t):
            return n, matcher.final_text()
    return len(ids), matcher.final_text()


# token ids: random (byte tokens that split or break UTF-8, special ids, ids past the tokenizer's
# vocabulary as a padded embedding has them) mixed with encodings of text with multi-byte characters
_TEXT = st.text(alphabet=st.sampled_from(list("ab ()=:\n\t.éü→€中😀\ufffd")), max_size=12)


@st.composite
def _case(draw):
    tok = _tok()
    vocab = len(tok)
    ids: list[int] = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            ids += draw(st.lists(st.integers(0, vocab + 3), min_size=1, max_size=8))
        else:
            ids += tok.encode(draw(_TEXT), add_special_tokens=False)
    if not ids:
        ids = [draw(st.integers(0, vocab - 1))]
    text = tok.decode(ids, skip_special_tokens=True)
    stops = []
    for _ in range(draw(st.integers(1, 3))):
        if text and draw(st.integers(0, 3)):
            i = draw(st.integers(0, len(text) - 1))
            stops.append(text[i:i + draw(st.integers(1, 5))])
        else:
            stops.append(draw(_TEXT.filter(bool)))
    return ids, stops


def test_fixture_tokenizer_takes_the_incremental_path():
    pieces = _pieces()
    assert pieces is not None and len(pieces) == len(_tok())
    # the special ids decode to nothing when skipped
    assert all(pieces[i] == b"" for i in _tok().all_special_ids)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_case())
def test_incremental_matches_full_decode_rule(case):
    ids, stops = case
    tok = _tok()
    expected = _full_rule(tok, ids, stops)
    m = StopStringMatcher(tok, stops, _pieces())
    assert _run(m, ids) == expected
    # and the text it keeps is the tokenizer's decode of what it saw
    assert m.text() == tok.decode(m.ids, skip_special_tokens=True)


@settings(max_examples=40, deadline=None)
@given(_case())
def test_full_decode_path_matches_rule(case):
    ids, stops = case
    assert _run(StopStringMatcher(_tok(), stops, None), ids) == _full_rule(_tok(), ids, stops)


def test_split_multibyte_character_found_only_when_complete():
    tok = _tok()
    ids = tok.encode("x 😀 y", add_special_tokens=False)
    m = StopStringMatcher(tok, ["😀"], _pieces())
    hits = [m.push(t) for t in ids]
    n = hits.index(True) + 1
    assert n == _full_rule(tok, ids, ["😀"])[0]
    assert "😀" not in tok.decode(ids[:n - 1]) and m.final_text() == "x "


def test_replacement_character_stop_matches_incomplete_tail_like_full_decode():
    # an incomplete UTF-8 tail decodes to U+FFFD in the full decode, so a stop "\ufffd" fires there
    tok = _tok()
    ids = tok.encode("a€", add_special_tokens=False)
    assert len(ids) > 2, "the fixture splits € into byte tokens"
    expected = _full_rule(tok, ids, ["\ufffd"])
    assert expected[0] < len(ids)
    assert _run(StopStringMatcher(tok, ["\ufffd"], _pieces()), ids) == expected


def test_other_decoders_and_cleanup_take_the_full_decode_path():
    from tokenizers import decoders

    tok = copy.deepcopy(_tok())
    tok.backend_tokenizer.decoder = decoders.Metaspace()
    assert byte_pieces(tok) is None
    cleaned = copy.deepcopy(_tok())
    cleaned.clean_up_tokenization_spaces = True
    cleaned.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    ids = cleaned.encode("a . b", add_special_tokens=False)
    assert cleaned.decode(ids) != cleaned.backend_tokenizer.decode(ids), "cleanup is active"
    assert byte_pieces(cleaned) is None


def test_added_tokens_keep_the_rule():
    import random

    tok = copy.deepcopy(_tok())
    tok.add_tokens(["<tool>", "a b", "é→"])
    tok.add_special_tokens({"additional_special_tokens": ["<|sp|>"]})
    pieces = byte_pieces(tok)
    assert pieces is not None and pieces[tok.convert_tokens_to_ids("<|sp|>")] == b""
    rng = random.Random(0)
    added = [tok.convert_tokens_to_ids(t) for t in ("<tool>", "a b", "é→", "<|sp|>")]
    for _ in range(60):
        ids = [rng.choice(added) if rng.random() < 0.3 else rng.randrange(len(tok)) for _ in range(rng.randint(1, 25))]
        text = tok.decode(ids, skip_special_tokens=True)
        i = rng.randrange(max(1, len(text)))
        stops = [text[i:i + rng.randint(1, 4)] or "é→", "b<to"]
        assert _run(StopStringMatcher(tok, stops, pieces), ids) == _full_rule(tok, ids, stops)


def test_bad_stop_lists_are_refused():
    for bad in ([], [""], [3]):
        with pytest.raises(ValueError, match="stop"):
            StopStringMatcher(_tok(), bad, None)


def test_engine_stops_like_the_full_decode_and_decodes_once():
    tok = _tok()
    model = tiny_model("llama", vocab_size=len(tok))
    try:
        engine = Engine(model, tok)
        prompt = "def f(x):"
        free = engine.generate([prompt], SamplingParams(max_new_tokens=40), use_tqdm=False)[0]
        assert engine.book._stop_pieces is not None  # derived once per engine, before the counting starts
        calls = []
        original = tok.decode
        text = free.text
        for stops in ([text[20:23]], [text[30:31], text[12:16]], ["never here"]):
            n, expected_text = _full_rule(tok, free.token_ids, stops)
            tok.decode = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
            try:
                out = engine.generate([prompt], SamplingParams(max_new_tokens=40, stop=stops), use_tqdm=False)[0]
            finally:
                del tok.decode
            assert out.token_ids == free.token_ids[:n]
            assert out.text == expected_text
            assert out.finish_reason == ("stop" if stops != ["never here"] else "length")
        # no full decode per token, nor at the end
        assert calls == []
    finally:
        hf_turbo.restore(model)
