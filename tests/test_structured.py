"""Structured output through xgrammar: compile errors name the field, matcher state under speculation,
constrained greedy == stock ``generate()`` with xgrammar's own transformers processor (5 architectures,
padded batches, and with speculation on), sampled JSON always validates."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

import hf_turbo
from hf_turbo.config import SpeculativeConfig
from hf_turbo.eval.exactness import masked_batch
from hf_turbo.grammar import GrammarCompilerCache, GrammarState
from hf_turbo.sampling import SamplingParams
from hf_turbo.testing import fixture_path, tiny_model

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")
import xgrammar.contrib.hf  # noqa: E402, F401  (loads the transformers processor)

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "kind": {"enum": ["cat", "dog"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["id"]}}, "required": ["name", "age", "kind", "tags", "owner"]}
EOS = 0  # the fixture tokenizer's <|endoftext|>


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fixture_path())


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompilerCache(tok, 512, [EOS])


def test_bad_specs_raise_value_errors_naming_the_field(compiler):
    cases = {"json_schema": {"type": "objectx"}, "regex": "(ab", "grammar": "root ::= ", "choices": ["a", ""]}
    for field, value in cases.items():
        with pytest.raises(ValueError, match=field):
            compiler.compile(field, value) if field != "choices" else SamplingParams(choices=value)
    with pytest.raises(ValueError, match="json_schema"):
        compiler.compile("json_schema", {"type": "object", "properties": 5})  # caught by the meta-schema
    with pytest.raises(ValueError, match="at most one"):
        SamplingParams(regex="a", json_schema={})
    with pytest.raises(ValueError, match="SamplingParams.n"):
        SamplingParams(n=0)


def test_fill_under_proposals_matches_stepwise_states_and_rolls_back(compiler, tok):
    g = compiler.compile("json_schema", SCHEMA)
    ids = tok.encode('{"name": "ab", "age": 1')
    state, ref = GrammarState(g), GrammarState(g)
    for t in ids[:2]:
        assert state.accept(t) and ref.accept(t)
    before = torch.zeros(1, 16, dtype=torch.int32)
    state.fill(before, 0)
    proposals = ids[2:6] + [5]  # the last proposal breaks the grammar
    bm = torch.zeros(len(proposals) + 1, 16, dtype=torch.int32)
    state.fill(bm, 0, proposals)
    for j, t in enumerate(proposals):
        one = torch.zeros(1, 16, dtype=torch.int32)
        ref.fill(one, 0)
        assert torch.equal(bm[j], one[0]), j
        if not ref.accept(t):
            assert torch.equal(bm[j + 1], bm[j])  # past a refused proposal: never emitted, a copy
            break
    after = torch.zeros(1, 16, dtype=torch.int32)
    state.fill(after, 0)
    assert torch.equal(before, after)  # proposals never advance the state


def _stock_vs_engine(model, tok, compiled, caplog, **kw):
    """Stock generate() with xgrammar's processor, then accelerated with a fresh one (no fallback)."""
    stock = model.generate(**kw, logits_processor=[xgr.contrib.hf.LogitsProcessor(compiled)])
    hf_turbo.accelerate(model)
    try:
        with caplog.at_level(logging.INFO, logger="hf_turbo"):
            fast = model.generate(**kw, logits_processor=[xgr.contrib.hf.LogitsProcessor(compiled)])
        assert not [r for r in caplog.records if "falls back" in r.getMessage()]
        hf_turbo.get_engine(model).check_invariants()
    finally:
        hf_turbo.restore(model)
    return stock, fast


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "gemma", "phi3"])
def test_constrained_greedy_equals_stock_with_xgrammar_processor(arch, tok, compiler, caplog):
    model = tiny_model(arch, eos_token_id=EOS)
    ids, mask = masked_batch(512, seed=7, holes=True)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=EOS,
              eos_token_id=EOS)
    compiled = compiler.compile("json_schema", SCHEMA)
    stock, fast = _stock_vs_engine(model, tok, compiled, caplog, **kw)
    assert torch.equal(stock, fast)
    plain = model.generate(**kw)
    assert not torch.equal(plain, stock)  # the grammar changed the output: the test can fail
    for row in stock[:, ids.shape[1]:]:  # every row is a prefix of schema-shaped JSON
        text = tok.decode([t for t in row.tolist() if t != EOS])
        assert text.startswith('{"name": "')


def test_regex_and_choices_batch_of_different_grammars_equal_stock(tok, compiler, caplog):
    model = tiny_model("llama", eos_token_id=EOS)
    ids, mask = masked_batch(512, seed=2, rows=2)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=EOS,
              eos_token_id=EOS)
    grammars = [compiler.compile("regex", r"[0-9]{2}-[a-f]{1,4}"), compiler.compile("choices", ["alpha", "beta"])]
    stock, fast = _stock_vs_engine(model, tok, grammars, caplog, **kw)
    assert torch.equal(stock, fast)
    texts = [tok.decode([t for t in r.tolist() if t != EOS]) for r in stock[:, ids.shape[1]:]]
    assert re.fullmatch(r"[0-9]{2}-[a-f]{1,4}", texts[0]) and texts[1] in ("alpha", "beta")


def test_xgrammar_processor_not_last_falls_back_with_the_reason(tok, compiler, caplog):
    from transformers import LogitsProcessor

    class Same(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores

    model = tiny_model("llama", eos_token_id=EOS)
    hf_turbo.accelerate(model)
    try:
        with caplog.at_level(logging.INFO, logger="hf_turbo"):
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=EOS,
                           logits_processor=[xgr.contrib.hf.LogitsProcessor(compiler.compile("regex", "a+")),
                                             Same()])
    finally:
        hf_turbo.restore(model)
    assert any("xgrammar's processor must be the last" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_speculation_keeps_constrained_greedy_equal_to_stock(arch, tok, compiler):
    model = tiny_model(arch, eos_token_id=EOS)
    prompt = tok.encode('{"name": "ab", "age": 1, "kind": "cat", "tags": ["a"], "owner": {"id": 3}}\n' * 3)
    compiled = compiler.compile("json_schema", SCHEMA)
    stock = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=EOS,
                           eos_token_id=EOS, logits_processor=[xgr.contrib.hf.LogitsProcessor(compiled)])
    eng = hf_turbo.Engine(model, tok, num_blocks=64, debug_checks=True,
                          speculative=SpeculativeConfig(method="ngram", num_tokens=4, adaptive=False))
    try:
        out = eng.generate([prompt], SamplingParams(max_new_tokens=40, json_schema=SCHEMA), use_tqdm=False)[0]
        stats = eng.stats()
    finally:
        eng.close()
        hf_turbo.restore(model)
    assert out.token_ids == stock[0, len(prompt):].tolist()  # batch of one: stock has no padding
    assert 0 < stats["spec_accepted"] < stats["spec_proposed"]  # accepted and rejected proposals both
    assert stats["grammar_mask_steps"] > 0


def test_sampled_json_always_validates_and_choices_regex_match(tok):
    model = tiny_model("llama", eos_token_id=EOS)
    eng = hf_turbo.Engine(model, tok, num_blocks=256)
    try:
        params = [SamplingParams(max_new_tokens=200, temperature=1.0, seed=s, json_schema=SCHEMA) for s in range(12)]
        params += [SamplingParams(max_new_tokens=20, temperature=1.0, seed=s, regex=r"[a-c]{2,5}!") for s in range(4)]
        params += [SamplingParams(max_new_tokens=20, temperature=1.0, seed=s, choices=["up", "down"]) for s in range(4)]
        outs = eng.generate(["{"] * len(params), params, use_tqdm=False)
        eng.check_invariants()
        with pytest.raises(ValueError, match="json_schema"):
            eng.add_request("x", SamplingParams(json_schema={"type": "objectx"}))
        assert not eng.requests and eng.generate("x", SamplingParams(max_new_tokens=2), use_tqdm=False)
    finally:
        eng.close()
    for o in outs[:12]:
        assert o.finish_reason == "stop"
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert all(re.fullmatch(r"[a-c]{2,5}!", o.text) for o in outs[12:16])
    assert all(o.text in ("up", "down") for o in outs[16:])
    assert len({o.text for o in outs[:12]}) > 1  # sampling, not one greedy answer


def test_draft_model_speculation_keeps_constrained_greedy_equal_to_stock(tok, compiler):
    from hf_turbo.loading import load_model_and_tokenizer

    target, _ = load_model_and_tokenizer("fixture", device="cpu")
    draft, _ = load_model_and_tokenizer(str(fixture_path("draft")), device="cpu")
    schema = {"type": "object", "properties": {"code": {"type": "string", "maxLength": 60}}, "required": ["code"]}
    prompt = tok.encode("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n")
    compiled = compiler.compile("json_schema", schema)
    stock = target.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=EOS,
                            eos_token_id=EOS, logits_processor=[xgr.contrib.hf.LogitsProcessor(compiled)])
    eng = hf_turbo.Engine(target, tok, num_blocks=64, debug_checks=True,
                          speculative=SpeculativeConfig(method="draft", draft_model=draft, num_tokens=4,
                                                        adaptive=False))
    try:
        out = eng.generate([prompt], SamplingParams(max_new_tokens=40, json_schema=schema), use_tqdm=False)[0]
        stats = eng.stats()
    finally:
        eng.close()
    assert out.token_ids == stock[0, len(prompt):].tolist()  # batch of one: stock has no padding
    assert 0 < stats["spec_accepted"] < stats["spec_proposed"]  # accepted and rejected proposals both
