"""Compiled grammars, cached per tokenizer and spec: xgrammar's ``GrammarCompiler`` with its cache.

One :class:`GrammarCompilerCache` belongs to one (tokenizer, vocabulary size, stop ids): the Engine
owns one, and the server compiles through it in its preparation threads, so a request reaches the
engine thread with its grammar already in the cache. A spec xgrammar rejects raises ValueError naming
the ``SamplingParams`` field it came from.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from typing import Any

__all__ = ["GrammarCompilerCache", "compiled_for", "require_xgrammar", "spec_of", "GRAMMAR_FIELDS"]

# the SamplingParams fields that ask for a grammar (at most one per request)
GRAMMAR_FIELDS = ("json_schema", "regex", "grammar", "choices")
_XGR_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'
_MAX_SCHEMAS = 256  # compiled schemas kept (oldest out first)


def require_xgrammar():
    """The ``xgrammar`` module, or ValueError saying how to install it."""
    try:
        import xgrammar
    except ImportError:
        raise ValueError("structured output (json_schema, regex, grammar, choices) needs xgrammar: "
                         "pip install 'hf-turbo[serve]' or pip install 'xgrammar>=0.2.9,<0.3'") from None
    return xgrammar


def spec_of(params) -> tuple[str, Any] | None:
    """``(field, value)`` of the grammar a ``SamplingParams`` asks for, or None."""
    for name in GRAMMAR_FIELDS:
        value = getattr(params, name, None)
        if value is not None:
            return name, value
    return None


def compiled_for(compiled, vocab_size: int):
    """A caller's ``xgrammar.CompiledGrammar``, checked against the model's vocabulary size."""
    if compiled.tokenizer_info.vocab_size > vocab_size:
        raise ValueError(f"SamplingParams.grammar was compiled for a vocabulary of "
                         f"{compiled.tokenizer_info.vocab_size} tokens; this model has {vocab_size}")
    return compiled


def _choices_ebnf(choices: Sequence[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def _clean(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _XGR_LOG_PREFIX.sub("", text)


class GrammarCompilerCache:
    """Compiles grammar specs for one tokenizer; compiled grammars are cached by spec (thread-safe).

    ``vocab_size``: the model's output width (the bitmask covers it all); ``stop_token_ids``: the ids
    that end a request (the grammar allows them exactly where the output is complete).
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        xgr = require_xgrammar()
        if tokenizer is None:
            raise ValueError("structured output needs the Engine's tokenizer (pass one to the Engine)")
        stops = list(stop_token_ids) or None
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=True)
        self._json: dict[str, Any] = {}  # schema text -> compiled grammar
        self._lock = threading.Lock()

    def compile(self, field: str, value: Any):
        """The ``xgrammar.CompiledGrammar`` of ``SamplingParams.<field> = value``; ValueError naming the field."""
        if isinstance(value, require_xgrammar().CompiledGrammar):
            return compiled_for(value, self.vocab_size)
        try:
            if field == "json_schema":
                return self._compile_json(value)
            if field == "regex":
                return self._compiler.compile_regex(value)
            if field == "grammar":
                return self._compiler.compile_grammar(value)
            if field == "choices":
                return self._compiler.compile_grammar(_choices_ebnf(value))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"SamplingParams.{field} is not a valid {_WHAT[field]}: {_clean(exc)}") from None
        raise ValueError(f"unknown grammar field {field!r}; expected one of {GRAMMAR_FIELDS}")

    def _compile_json(self, schema: Any):
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ValueError(f"the schema is not JSON ({exc})") from None
        if not isinstance(schema, dict):
            raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        _check_meta_schema(schema)
        # property order is output order: the text as given is the key; compact separators, so a sampled
        # row cannot wander through unbounded whitespace
        text = json.dumps(schema)
        with self._lock:
            hit = self._json.get(text)
        if hit is None:
            xgr = require_xgrammar()
            ebnf = str(xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True))
            # xgrammar 0.2's length-bounded strings allow raw control characters, which JSON forbids
            hit = self._compiler.compile_grammar(ebnf.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR))
            with self._lock:
                if len(self._json) >= _MAX_SCHEMAS:
                    self._json.pop(next(iter(self._json)))
                self._json[text] = hit
        return hit

_WHAT = {"json_schema": "JSON schema", "regex": "regular expression", "grammar": "EBNF grammar",
         "choices": "list of choices"}


def _check_meta_schema(schema: dict) -> None:
    """Against JSON Schema's meta-schema when ``jsonschema`` is installed (xgrammar ignores some errors)."""
    try:
        import jsonschema
    except ImportError:
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise ValueError(f"{exc.message}" + (f" (at {where})" if where else "")) from None
