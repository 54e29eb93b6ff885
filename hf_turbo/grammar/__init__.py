"""Structured output through xgrammar: compiled grammars cached per tokenizer and spec (``compiler``),
per-request matcher state advanced by accepted tokens (``state``), token bitmasks filled in a worker
thread during the forward and applied on the logits' device (``masks``)."""

from __future__ import annotations

from hf_turbo.grammar.compiler import GRAMMAR_FIELDS, GrammarCompilerCache, require_xgrammar, spec_of
from hf_turbo.grammar.masks import MaskFiller, apply_masks, bitmask_width
from hf_turbo.grammar.state import GrammarState

__all__ = ["GRAMMAR_FIELDS", "GrammarCompilerCache", "GrammarState", "MaskFiller", "apply_masks", "bitmask_width",
           "require_xgrammar", "spec_of"]
