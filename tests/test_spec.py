"""Speculative decoding: output is token for token the output without it, whatever gets accepted."""

from __future__ import annotations

import functools
import math
from collections import Counter

import pytest
import torch

import hf_turbo
from hf_turbo import Engine, SamplingParams, TurboConfig
from hf_turbo.engine.spec import AdaptiveK, NgramProposer, SpeculativeConfig
from hf_turbo.engine.spec.adaptive import PROBE_EVERY, PROBE_REQUESTS
from hf_turbo.testing import fixture_path, tiny_model

pytestmark = pytest.mark.timeout(180)

MAX_NEW = 16
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW)


@functools.cache
def _model(seed: int = 0, vocab_size: int = 512):
    return tiny_model("llama", seed=seed, vocab_size=vocab_size)


@functools.cache
def _fixture(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = fixture_path(name)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _prompts(n: int = 5, vocab: int = 512, seed: int = 0) -> list[list[int]]:
    """Random prompts, half of them a phrase said twice (so prompt lookup finds matches)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(3, vocab - 1, (int(torch.randint(3, 24, (1,), generator=g)),), generator=g).tolist()
        out.append(p + p[: len(p) // 2] if i % 2 else p)
    return out


@functools.cache
def _stock(seed: int = 0) -> tuple[tuple[int, ...], ...]:
    model = _model()
    return tuple(tuple(model.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                                      do_sample=False, pad_token_id=0)[0, len(p):].tolist())
                 for p in _prompts(seed=seed))


def _run(model, prompts, params, spec: SpeculativeConfig | None = None, tokenizer=None, **overrides):
    """Outputs and stats of one engine run, with every step's invariants checked and no block left over."""
    overrides = {"num_blocks": 512, **overrides}  # a small pool keeps the per-step invariant checks cheap
    engine = Engine(model, tokenizer, TurboConfig(debug_checks=True, speculative=spec).replace(**overrides))
    try:
        outs = engine.generate(prompts, params, use_tqdm=False)
        _assert_no_leak(engine)
        return [o.token_ids for o in outs], engine.stats()
    finally:
        engine.close()


def _assert_no_leak(engine: Engine) -> None:
    assert not engine.has_unfinished() and not engine.requests
    engine.check_invariants()
    assert engine.pool.num_free == engine.pool.num_blocks, "target KV blocks leaked"
    draft_pool = getattr(engine.spec.proposer, "pool", None) if engine.spec is not None else None
    if draft_pool is not None:
        assert draft_pool.num_free == draft_pool.num_blocks, "draft KV blocks leaked"


# -- greedy: equal to the plain engine and to stock generate ------------------------------------
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("proposer", ["self_draft", "random_draft", "ngram"])
def test_greedy_equals_plain_and_stock(proposer, k):
    model = _model()
    method = "ngram" if proposer == "ngram" else "draft"
    draft = {"self_draft": model, "random_draft": _model(seed=1), "ngram": None}[proposer]
    spec = SpeculativeConfig(method, draft_model=draft, num_tokens=k, adaptive=False)
    try:
        got, stats = _run(model, _prompts(), GREEDY, spec)
        plain, _ = _run(model, _prompts(), GREEDY)
    finally:
        hf_turbo.restore(model)
    assert got == plain == [list(s) for s in _stock()]
    assert stats["spec_proposed"] > 0
    if proposer == "self_draft":
        assert stats["acceptance_rate"] > 0.95
        assert stats["mean_accepted_per_step"] > 1 + 0.5 * k
    if proposer == "random_draft":
        assert stats["acceptance_rate"] < 0.2
    assert not hf_turbo.is_accelerated(_model(seed=1)), "the draft's attention was not given back"


def test_adaptive_engine_equals_plain_under_preemption_and_prefix_cache():
    model = _model()
    prompts = _prompts(8, seed=3)
    prompts += [prompts[1] + [7, 8, 9]]  # shares a prefix with request 1 (prefix cache hit)
    tight = {"num_blocks": 24, "block_size": 4, "max_num_batched_tokens": 64}
    try:
        plain, _ = _run(model, prompts, GREEDY)
        for spec in (SpeculativeConfig("draft", draft_model=model, num_tokens=4),
                     SpeculativeConfig("draft", draft_model=_model(seed=1), num_tokens=4),
                     SpeculativeConfig("ngram", num_tokens=3)):
            got, stats = _run(model, prompts, GREEDY, spec, **tight)
            assert got == plain, spec.method
            assert stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    finally:
        hf_turbo.restore(model)


# -- the trained fixture pair -------------------------------------------------------------------
def test_fixture_pair_greedy_with_preemption_and_stops():
    target, tok = _fixture("target")
    draft, _ = _fixture("draft")
    texts = ["def add(a, b):\n", "import os\nimport sys\n", "class A:\n    def f(self):\n        return"]
    stock = []
    for t in texts:
        ids = tok(t, return_tensors="pt")["input_ids"]
        stock.append(target.generate(ids, max_new_tokens=16, do_sample=False,
                                     pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist())
    params = SamplingParams(max_new_tokens=16)
    stops = SamplingParams(max_new_tokens=16, stop=["\n"], stop_token_ids=(stock[0][5],))
    try:
        plain_stops, _ = _run(target, texts, stops, tokenizer=tok)
        for spec in (SpeculativeConfig("draft", draft_model=draft, num_tokens=3, adaptive=False),
                     SpeculativeConfig("ngram", num_tokens=4, adaptive=False)):
            got, stats = _run(target, texts, params, spec, tok, num_blocks=10, block_size=4)
            assert got == stock and stats["preemptions"] > 0 and stats["spec_proposed"] > 0, spec.method
            got, _ = _run(target, texts, stops, spec, tok)  # stop token / string met inside accepted runs
            assert got == plain_stops, spec.method
    finally:
        hf_turbo.restore(target)


# -- sampling: coupled, so seeded output is identical with speculation on or off ----------------
def test_seeded_sampling_identical_with_and_without_speculation():
    model = _model(vocab_size=16)
    prompts = [[3, 5, 7, 3, 5], [9, 2], [4, 4, 4, 4]] * 8
    kinds = [{"temperature": 0.9, "top_k": 12}, {"temperature": 0.7, "repetition_penalty": 1.3, "min_new_tokens": 4},
             {"repetition_penalty": 1.2}]  # the last one greedy
    params = [SamplingParams(max_new_tokens=10, seed=s, **kinds[s % 3]) for s in range(len(prompts))]
    try:
        plain, _ = _run(model, prompts, params)
        for spec in (SpeculativeConfig("draft", draft_model=model, num_tokens=3, adaptive=False),
                     SpeculativeConfig("draft", draft_model=_model(seed=1, vocab_size=16), num_tokens=3),
                     SpeculativeConfig("ngram", num_tokens=2, adaptive=False)):
            got, stats = _run(model, prompts, params, spec)
            assert got == plain, spec.method
            assert stats["spec_proposed"] > 0  # verify steps ran
            # the fixed-k ones keep speculating, so some proposals are accepted (the adaptive one, an
            # unrelated draft, may stop after its first rejected probes)
            assert stats["spec_accepted"] > 0 or spec.adaptive
    finally:
        hf_turbo.restore(model)


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.001 quantile of chi-square(df) (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_speculative_sampling_follows_softmax():
    """Token 2 of many seeded requests (chosen in verify steps) vs softmax(logits / T) of its prefix."""
    model = _model(vocab_size=16)
    prompt, temp, n = [3, 5, 7], 1.3, 1000
    spec = SpeculativeConfig("draft", draft_model=model, num_tokens=2, adaptive=False, max_batch_for_spec=256)
    try:
        params = [SamplingParams(max_new_tokens=3, temperature=temp, seed=s) for s in range(n)]
        outs, stats = _run(model, [prompt] * n, params, spec, max_num_seqs=256)
    finally:
        hf_turbo.restore(model)
    assert stats["spec_verify_steps"] >= n * 0.9
    first = Counter(o[0] for o in outs).most_common(1)[0][0]
    seconds = Counter(o[1] for o in outs if o[0] == first)
    total = sum(seconds.values())
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt + [first]])).logits[0, -1] / temp, -1).tolist()
    # chi-square over tokens with expected count >= 5, the rest pooled
    big = [t for t in range(16) if probs[t] * total >= 5]
    observed = [seconds[t] for t in big] + [total - sum(seconds[t] for t in big)]
    expected = [probs[t] * total for t in big] + [total * (1 - sum(probs[t] for t in big))]
    if expected[-1] < 5:
        observed, expected = observed[:-1], expected[:-1]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    assert total > 200 and len(observed) >= 3
    assert chi2 < _chi2_critical(len(observed) - 1), (chi2, observed, expected)


def test_logprobs_scores_and_streaming_with_speculation():
    model = _model()
    spec = SpeculativeConfig("draft", draft_model=model, num_tokens=3, adaptive=False)
    params = SamplingParams(max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, logprobs=2)
    try:
        engine = Engine(model, config=TurboConfig(speculative=spec).replace(num_blocks=64))
        got = engine.generate(_prompts()[:2], params, use_tqdm=False)
        plain = Engine(model, num_blocks=64).generate(_prompts()[:2], params, use_tqdm=False)
        engine.close()
        for g, p in zip(got, plain):
            assert g.token_ids == p.token_ids and len(g.logprobs) == MAX_NEW
            for eg, ep in zip(g.logprobs, p.logprobs):
                assert eg.keys() == ep.keys() and all(abs(eg[t] - ep[t]) < 1e-4 for t in eg)
        ids = torch.tensor([_prompts()[1]])
        ref = model.generate(ids, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
        streamed = []

        class Streamer:
            def put(self, value):
                streamed.append(value.reshape(-1).tolist())

            def end(self):
                pass

        out = model.generate(ids, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True, assistant_model=model,
                             streamer=Streamer())
        assert torch.equal(out.sequences, ref.sequences) and len(out.scores) == MAX_NEW
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(out.scores, ref.scores))
        assert sum(streamed[1:], []) == ref.sequences[0, ids.shape[1]:].tolist()  # after the prompt, every token
        assert len(streamed) < MAX_NEW + 1  # several per step
    finally:
        hf_turbo.restore(model)


# -- KV bookkeeping ---------------------------------------------------------------------------
def test_no_block_leaks_after_rejections_aborts_and_preemption_mid_verification():
    model = _model()
    spec = SpeculativeConfig("draft", draft_model=_model(seed=1), num_tokens=4, adaptive=False)
    engine = Engine(model, config=TurboConfig(debug_checks=True, speculative=spec).replace(num_blocks=20, block_size=4))
    mid_verification = []
    preempt = engine.scheduler._preempt

    def spy(victim, out):
        mid_verification.append(bool(victim.spec_tokens))
        preempt(victim, out)

    engine.scheduler._preempt = spy
    try:
        prompts = _prompts(6, seed=5)
        params = SamplingParams(max_new_tokens=20, min_new_tokens=20)
        rids = [engine.add_request(p, params) for p in prompts]
        outs = {}
        for step in range(400):
            if step == 6:
                engine.abort(rids[2])
            for o in engine.step():
                if o.finished:
                    outs[o.request_id] = o.token_ids
            if not engine.has_unfinished():
                break
        _assert_no_leak(engine)
        assert engine.stats()["spec_proposed"] > engine.stats()["spec_accepted"]  # rejections happened
        assert any(mid_verification), "no request was preempted holding proposals"
        plain, _ = _run(model, prompts, params)
        assert [outs[r] for r in rids if r != rids[2]] == [p for i, p in enumerate(plain) if i != 2]
    finally:
        engine.close()
        hf_turbo.restore(model)


# -- proposers and the adaptive k ------------------------------------------------------------------
def _req(tokens: list[int], rid: str = "r"):
    from hf_turbo.engine.request import Request

    return Request(rid, tokens, SamplingParams(), 0)


def test_ngram_proposer_prefers_longest_then_most_recent_match():
    ng = NgramProposer(n_max=3, n_min=1)
    assert ng.lookup(_req([1, 2, 3, 9, 8, 1, 2, 3, 4, 0, 2, 3], "a"), 3) == [4, 0, 2]  # two [2, 3]: most recent
    assert ng.lookup(_req([1, 2, 3, 9, 7, 2, 3, 8, 1, 2, 3], "f"), 2) == [9, 7]  # [1, 2, 3] beats a later [2, 3]
    assert ng.lookup(_req([5, 2, 3, 7, 1, 2, 3, 6, 1, 2, 3], "b"), 2) == [6, 1]  # most recent [1, 2, 3]
    assert ng.lookup(_req([5, 6, 7, 8], "c"), 4) == []  # no match: no proposal
    assert ng.lookup(_req([4, 1, 4], "d"), 5) == [1, 4, 1, 4, 1]  # runs into the end: the loop goes on
    assert ng.lookup(_req([7, 3, 3], "g"), 3) == [3, 3, 3]
    assert NgramProposer(n_max=3, n_min=2).lookup(_req([1, 9, 2, 1], "e"), 2) == []  # only a 1-gram matches


def test_adaptive_k_backs_off_and_probes():
    ctl = AdaptiveK(k_max=6)
    for _ in range(10):
        ctl.record("good", 6, 6)
        ctl.record("bad", 2, 0)
    assert ctl.plan(["good"], [6], 1, 0.01, 0.1) == [6]
    assert ctl.plan(["good"], [2], 1, 0.01, 0.1) == [2]  # capped (max_new_tokens)
    assert ctl.plan(["good", "bad"], [6, 6], 2, 0.01, 0.1) == [6, 0]  # only who pays its way
    assert ctl.plan(["good"], [6], 1, 0.01, 2.0) == [0]  # a draft forward dearer than two steps: plain
    ks = [ctl.plan(["bad"], [6], 1, 0.01, 0.1)[0] for _ in range(3 * PROBE_EVERY)]
    assert [i for i, k in enumerate(ks) if k] == [PROBE_EVERY - 2, 3 * PROBE_EVERY - 2]  # probes, backing off
    ctl = AdaptiveK(k_max=6)
    ids = [f"r{i}" for i in range(6)]
    probes = [ctl.plan(ids, [6] * 6, 6, 1.0, 0.0) for _ in range(PROBE_EVERY)]  # verifying costs a whole step
    assert probes[:-1] == [[0] * 6] * (PROBE_EVERY - 1) and probes[-1] == [1, 1, 1, 1, 0, 0]  # a few, in turn
    assert AdaptiveK(k_max=6, adaptive=False).plan(["x", "y"], [9, 3], 2, 1.0, 5.0) == [6, 3]


def test_adaptive_k_tries_a_few_requests_before_a_whole_batch_and_pools_what_it_learns():
    ctl = AdaptiveK(k_max=4)
    ids = [f"r{i}" for i in range(32)]
    first = ctl.plan(ids, [60] * 32, 32, 0.005, 0.05, drain=True)  # the prior (a = 0.7) says speculate
    assert first == [1] * PROBE_REQUESTS + [0] * (32 - PROBE_REQUESTS)
    # nothing proposed (say, no n-gram match): the next step tries the next few requests
    second = ctl.plan(ids, [60] * 32, 32, 0.005, 0.05, drain=True)
    assert second == [0] * PROBE_REQUESTS + [1] * PROBE_REQUESTS + [0] * (32 - 2 * PROBE_REQUESTS)
    for rid in ids[:PROBE_REQUESTS]:
        ctl.record(rid, 1, 0)  # rejected: the batch's acceptance is low
    assert ctl.rate("r31") < 0.5 and ctl.rate("r0") < 0.5  # unmeasured requests take the pooled estimate
    assert ctl.plan(ids, [60] * 32, 32, 0.005, 0.05, drain=True) == [0] * 32
    for _ in range(10):
        ctl.record("r0", 4, 4)
    assert ctl.plan(["r0"], [60], 1, 0.005, 0.05) == [4]  # a measured request keeps its own rate


def test_adaptive_k_when_the_batch_drains_speculates_all_or_none():
    ctl = AdaptiveK(k_max=6)
    for _ in range(10):
        ctl.record("good", 6, 6)
        ctl.record("good2", 6, 6)
        ctl.record("bad", 2, 0)
    # nothing waiting: the bad request alone sets the wall time, so speculating for "good" only would
    # make every step dearer and none fewer
    assert ctl.plan(["good", "bad"], [6, 6], 2, 0.01, 0.1, drain=True) == [0, 0]
    assert ctl.plan(["good", "good2"], [6, 6], 2, 0.01, 0.1, drain=True) == [6, 6]
    # the good request's longer remaining output decides: the bad one finishes first anyway
    assert ctl.plan(["good", "bad"], [60, 1], 2, 0.01, 0.1, drain=True) == [6, 1]
    assert ctl.plan(["good"], [6], 1, 0.01, 2.0, drain=True) == [0]


def test_skipped_plain_steps_probe_when_planning_every_step_would():
    """After a plan chose plain decoding, the decoder skips planning for the steps before the next probe:
    counted with skip(), the probe comes at the same step as when every step is planned."""
    def probe_steps(skipping: bool) -> list[int]:
        ctl = AdaptiveK(k_max=4)
        for _ in range(10):
            ctl.record("r0", 4, 0)  # never accepted: plain decoding, with a probe now and then
        left, probes = 0, []
        for step in range(3 * PROBE_EVERY + 8):
            if skipping and left > 0:
                left -= 1
                ctl.skip()
                continue
            ks = ctl.plan(["r0"], [100], 1, 0.01, 0.5)
            if any(ks):
                probes.append(step)
            else:
                left = ctl.plain_steps_left()
        return probes

    planned = probe_steps(False)
    assert planned and probe_steps(True) == planned


def test_draft_caches_shared_prefixes_in_its_own_pool():
    model = _model()
    g = torch.Generator().manual_seed(7)
    prefix = torch.randint(3, 500, (40,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 500, (n,), generator=g).tolist() for n in (2, 5, 9, 3)]
    spec = SpeculativeConfig("draft", draft_model=_model(seed=0), num_tokens=3, adaptive=False)
    try:
        plain, _ = _run(model, prompts, GREEDY)
        engine = Engine(model, config=TurboConfig(debug_checks=True, speculative=spec).replace(num_blocks=256,
                                                                                              block_size=8))
        try:
            outs = [o.token_ids for o in engine.generate(prompts, GREEDY, use_tqdm=False)]
            draft_pool = engine.spec.proposer.pool
            assert draft_pool.prefix_hits >= 3 * (40 // 8)  # requests 2-4 reuse the prefix the first computed
            assert outs == plain and engine.stats()["spec_accepted"] > 0
            _assert_no_leak(engine)
        finally:
            engine.close()
        # off with the engine's prefix caching: the draft computes every prompt itself, same output
        engine = Engine(model, config=TurboConfig(debug_checks=True, speculative=spec).replace(
            num_blocks=256, block_size=8, enable_prefix_caching=False))
        try:
            assert [o.token_ids for o in engine.generate(prompts, GREEDY, use_tqdm=False)] == plain
            assert engine.spec.proposer.pool.prefix_hits == 0
        finally:
            engine.close()
    finally:
        hf_turbo.restore(model)


def test_batch_backoff():
    model = _model()
    spec = SpeculativeConfig("draft", draft_model=model, num_tokens=3, adaptive=False, max_batch_for_spec=2)
    try:
        got, stats = _run(model, _prompts(), GREEDY, spec)
        assert stats["spec_proposed"] == 0  # five requests run at once: never speculated
        assert got == [list(s) for s in _stock()]
    finally:
        hf_turbo.restore(model)


# -- bad input ----------------------------------------------------------------------------------
def test_bad_speculative_config_is_rejected():
    model = _model()
    with pytest.raises(ValueError, match="num_tokens"):
        SpeculativeConfig("ngram", num_tokens=0)
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig("medusa")
    with pytest.raises(ValueError, match="draft_model is required"):
        SpeculativeConfig("draft")
    with pytest.raises(ValueError, match="ngram_max"):
        SpeculativeConfig("ngram", ngram_max=1, ngram_min=2)
    with pytest.raises(ValueError, match="TurboConfig.speculative"):
        TurboConfig(speculative="ngram")
    try:
        with pytest.raises(ValueError, match="vocabulary size 256 differs from the target's 512"):
            Engine(model, speculative=SpeculativeConfig("draft", draft_model=_model(vocab_size=256)))
        bf16 = tiny_model("llama", dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="dtype torch.bfloat16 differs"):
            Engine(model, speculative=SpeculativeConfig("draft", draft_model=bf16))
        with pytest.raises(ValueError, match="draft model must be a transformers causal LM"):
            Engine(model, speculative=SpeculativeConfig("draft", draft_model="gpt2"))
        assert not hf_turbo.is_accelerated(bf16) and not hf_turbo.is_accelerated(model)  # rejected before patching
    finally:
        if hf_turbo.is_accelerated(model):
            hf_turbo.restore(model)


def test_draft_tokenizer_mismatch_is_rejected():
    target, tok = _fixture("target")
    draft, draft_tok = _fixture("draft")
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(fixture_path("draft"))
    other.add_tokens(["<an_extra_token>"])
    try:
        with pytest.raises(ValueError, match="draft tokenizer differs"):
            Engine(target, tok, speculative=SpeculativeConfig("draft", draft_model=draft, draft_tokenizer=other))
        same = SpeculativeConfig("draft", draft_model=draft, draft_tokenizer=draft_tok)
        Engine(target, tok, speculative=same, num_blocks=64).close()
    finally:
        hf_turbo.restore(target)


# -- HF generate() arguments ---------------------------------------------------------------------
def test_generate_assistant_model_and_prompt_lookup_batched():
    model = _model()
    ids = torch.tensor([[0, 0, 5, 6, 7, 5, 6], [9, 8, 7, 6, 5, 4, 3], [0, 0, 0, 0, 11, 12, 13]])
    mask = (torch.arange(7)[None] >= torch.tensor([[2], [0], [4]])).long()
    kw = {"attention_mask": mask, "max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    ref = model.generate(ids, **kw)
    draft = _model(seed=1)
    hf_turbo.accelerate(model)
    try:
        assert torch.equal(model.generate(ids, assistant_model=draft, **kw), ref)
        assert torch.equal(model.generate(ids, assistant_model=model, num_assistant_tokens=3, **kw), ref)
        assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=3, **kw), ref)
        engines = model._hf_turbo.extras["spec_engines"]
        assert len(engines) == 3 and all(e.stats()["spec_proposed"] > 0 for e in engines.values())
        assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=3, **kw), ref)  # cached engine
        assert len(engines) == 3
    finally:
        hf_turbo.restore(model)
    assert not hf_turbo.is_accelerated(draft)
