"""Engine: continuous batching is token-exact with stock generate() under every scheduling variation."""

from __future__ import annotations

import functools

import pytest
import torch

import hf_turbo
from hf_turbo import Engine, SamplingParams
from hf_turbo.backends.cpu import vmem
from hf_turbo.testing import tiny_model

ARCHS = ("llama", "mistral", "qwen2", "gemma2", "gpt2", "phi3")
N_PROMPTS = 48
MAX_NEW = 12


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 70, (N_PROMPTS,), generator=g).tolist()
    return [torch.randint(3, vocab - 1, (n,), generator=g).tolist() for n in lengths]


@functools.cache
def _model(arch: str):
    return tiny_model(arch)


@functools.cache
def _stock(arch: str) -> tuple[tuple[int, ...], ...]:
    """Stock generate(), one prompt at a time, greedy: the reference."""
    model = _model(arch)
    outs = []
    for p in _prompts(model.config.vocab_size):
        seq = model.generate(input_ids=torch.tensor([p]), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                             do_sample=False, pad_token_id=0)
        outs.append(tuple(seq[0, len(p):].tolist()))
    return tuple(outs)


def _engine(arch: str, **overrides) -> Engine:
    model = _model(arch)
    return Engine(model, config=hf_turbo.TurboConfig(debug_checks=True).replace(**overrides))


def _run(engine: Engine, prompts, params) -> list[tuple[int, ...]]:
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert not engine.has_unfinished()
    engine.check_invariants()
    assert engine.pool.num_free == engine.pool.num_blocks, "KV blocks leaked"
    return [tuple(o.token_ids) for o in outs]


GREEDY = SamplingParams(max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW)

VARIATIONS = {
    "all_at_once": {},
    "chunked_prefill": {"max_num_batched_tokens": 16},
    "preemption": {"num_blocks": 32, "block_size": 4, "max_num_batched_tokens": 64},
    "no_prefix_cache": {"enable_prefix_caching": False},
    "small_batches": {"max_num_seqs": 3},
    # 64 positions x head_dim 16 x fp32 = one 4 KiB page per block and head: the CPU path's page-mapped arenas
    "page_mapped": {"block_size": 64, "max_num_batched_tokens": 256},
    "page_mapped_preemption": {"num_blocks": 6, "block_size": 64, "max_num_batched_tokens": 64},
}


@pytest.mark.parametrize("variation", list(VARIATIONS))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_stock(arch, variation):
    try:
        engine = _engine(arch, **VARIATIONS[variation])
        prompts = _prompts(_model(arch).config.vocab_size)
        got = _run(engine, prompts, GREEDY)
        if variation.endswith("preemption"):
            assert engine.stats()["preemptions"] > 0
        if variation == "chunked_prefill":
            assert engine.stats()["steps"] > N_PROMPTS
        if variation.startswith("page_mapped") and vmem.supported() and engine.backend.name == "cpu":
            assert engine.cache.backend_state.shares_pages
        assert got == list(_stock(arch))
    finally:
        hf_turbo.restore(_model(arch))


def test_fixture_greedy_equals_stock_under_variations():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_turbo.testing import fixture_path

    model = AutoModelForCausalLM.from_pretrained(fixture_path("target"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(fixture_path("target"))
    texts = ["def add(a, b):\n", "import sys\n", "class A:\n    def f(self):\n        return"] * 4
    texts += [f"x{i} = {i} * " for i in range(12)]
    stock = []
    for t in texts:
        ids = tok(t, return_tensors="pt")["input_ids"]
        stock.append(model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)[0,
                     ids.shape[1]:].tolist())
    try:
        for over in ({}, {"max_num_batched_tokens": 8}, {"num_blocks": 8, "block_size": 4}):
            engine = Engine(model, tok, hf_turbo.TurboConfig(debug_checks=True).replace(**over))
            outs = engine.generate(texts, SamplingParams(max_new_tokens=16), use_tqdm=False)
            assert [o.token_ids for o in outs] == stock, over
            assert outs[0].text == tok.decode(stock[0], skip_special_tokens=True)
            assert engine.pool.num_free == engine.pool.num_blocks
    finally:
        hf_turbo.restore(model)


@pytest.mark.parametrize("prefix_len, block_size", [(1, 8), (17, 8), (70, 8), (70, 64)])
def test_prefix_cache_cold_vs_warm(prefix_len, block_size):
    arch = "llama"
    model = _model(arch)
    g = torch.Generator().manual_seed(prefix_len)
    prefix = torch.randint(3, 400, (prefix_len,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 400, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 20, (12,), generator=g)]
    try:
        cold = _run(_engine(arch, enable_prefix_caching=False), prompts, GREEDY)
        engine = _engine(arch, block_size=block_size)  # 64: the page-mapped arenas share the prefix's pages
        first = _run(engine, prompts, GREEDY)  # fills the cache (requests also share within the run)
        warm = _run(engine, prompts, GREEDY)  # every full prefix block is now a hit
        stats = engine.stats()
        if prefix_len >= block_size:
            assert stats["prefix_cache_hits"] > 0
        assert cold == first == warm
        seq = [tuple(model.generate(input_ids=torch.tensor([p]), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                                    do_sample=False, pad_token_id=0)[0, len(p):].tolist()) for p in prompts[:3]]
        assert warm[:3] == seq
    finally:
        hf_turbo.restore(model)


def test_requests_sharing_a_prefix_wait_for_the_first_prefill_instead_of_recomputing_it():
    arch = "llama"
    model = _model(arch)
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(3, 400, (64,), generator=g).tolist()  # 8 full blocks of 8
    prompts = [prefix + torch.randint(3, 400, (n,), generator=g).tolist() for n in (3, 9, 14, 5)]
    try:
        engine = _engine(arch, block_size=8, max_num_batched_tokens=512)  # all four fit one step's budget
        outs = engine.generate(prompts, GREEDY, use_tqdm=False)  # a cold cache: only in-flight sharing
        assert [o.num_cached_tokens for o in outs] == [0, 64, 64, 64]
        engine.check_invariants()
        assert engine.pool.num_free == engine.pool.num_blocks
        cold = _run(_engine(arch, enable_prefix_caching=False), prompts, GREEDY)
        assert [tuple(o.token_ids) for o in outs] == cold
    finally:
        hf_turbo.restore(model)


def test_seeded_sampling_identical_across_variations():
    arch = "qwen2"
    prompts = _prompts(_model(arch).config.vocab_size)[:16]
    params = [SamplingParams(max_new_tokens=MAX_NEW, temperature=0.8, top_p=0.9, seed=i) for i in range(16)]
    try:
        results = [_run(_engine(arch, **over), prompts, params) for over in VARIATIONS.values()]
    finally:
        hf_turbo.restore(_model(arch))
    assert all(r == results[0] for r in results)


def test_bad_input_is_rejected_and_engine_keeps_serving():
    arch = "llama"
    model = _model(arch)
    try:
        engine = _engine(arch, num_blocks=64, block_size=4)
        rid = engine.add_request([5, 6, 7], GREEDY, request_id="dup")
        with pytest.raises(ValueError, match="request_id 'dup'"):
            engine.add_request([5, 6], GREEDY, request_id="dup")
        with pytest.raises(ValueError, match="out of the vocabulary"):
            engine.add_request([5, model.config.vocab_size], GREEDY)
        with pytest.raises(ValueError, match="out of the vocabulary"):
            engine.add_request([-1, 5], GREEDY)
        with pytest.raises(ValueError, match="empty"):
            engine.add_request([], GREEDY)
        with pytest.raises(ValueError, match="maximum length"):
            engine.add_request([5] * 510, GREEDY)
        with pytest.raises(ValueError, match="KV blocks"):
            engine.add_request([5] * 250, SamplingParams(max_new_tokens=60))
        with pytest.raises(ValueError, match="string but the Engine has no tokenizer"):
            engine.add_request("hello", GREEDY)
        with pytest.raises(ValueError, match="params"):
            engine.add_request([5], {"max_new_tokens": 3})
        while engine.has_unfinished():
            engine.step()
        assert engine.pool.num_free == engine.pool.num_blocks
        assert rid not in engine.requests
        engine.add_request([5, 6], GREEDY, request_id="dup")  # ids are reusable once finished
        assert _run(engine, [[9, 10, 11]], GREEDY)
    finally:
        hf_turbo.restore(model)


@pytest.mark.parametrize("field, value", [
    ("temperature", -1.0), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
    ("min_p", 1.5), ("repetition_penalty", 0.0), ("max_new_tokens", 0), ("min_new_tokens", -1), ("logprobs", -2),
])
def test_sampling_params_validation(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_abort_and_stats_and_logprobs():
    arch = "llama"
    try:
        engine = _engine(arch)
        a = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=30, logprobs=3))
        b = engine.add_request([8, 9], SamplingParams(max_new_tokens=5, logprobs=3))
        engine.step()
        engine.step()
        out = engine.abort(a)
        assert out.finish_reason == "abort" and len(out.token_ids) == 2
        assert engine.abort("nope") is None
        done = []
        while engine.has_unfinished():
            done += [o for o in engine.step() if o.finished]
        assert [o.request_id for o in done] == [b] and done[0].finish_reason == "length"
        lp = done[0].logprobs
        assert len(lp) == 5 and all(len(e) >= 3 for e in lp)
        assert all(tok in e for tok, e in zip(done[0].token_ids, lp))
        assert done[0].time_to_first_token > 0 and done[0].total_time >= done[0].time_to_first_token
        s = engine.stats()
        assert s["running"] == s["waiting"] == 0 and s["kv_blocks_used"] == 0
    finally:
        hf_turbo.restore(_model(arch))


def test_stop_strings_and_stop_token_ids():
    from transformers import AutoTokenizer

    from hf_turbo.testing import fixture_path

    tok = AutoTokenizer.from_pretrained(fixture_path("target"))
    model = tiny_model("llama", vocab_size=len(tok))
    try:
        engine = Engine(model, tok)
        free = engine.generate(["def f(x):"], SamplingParams(max_new_tokens=24), use_tqdm=False)[0]
        target_tok = free.token_ids[5]
        stopped = engine.generate(["def f(x):"], SamplingParams(max_new_tokens=24, stop_token_ids=(target_tok,)),
                                  use_tqdm=False)[0]
        first = free.token_ids.index(target_tok)
        assert stopped.token_ids == free.token_ids[: first + 1] and stopped.finish_reason == "stop"
        stop_str = free.text[6:8]
        s2 = engine.generate(["def f(x):"], SamplingParams(max_new_tokens=24, stop=[stop_str]), use_tqdm=False)[0]
        assert s2.finish_reason == "stop" and stop_str not in s2.text and free.text.startswith(s2.text)
    finally:
        hf_turbo.restore(model)


def test_run_to_completion_refuses_finished_ids():
    """A request that already finished (or was never added) cannot be waited for: a ValueError, not a loop."""
    engine = _engine("llama")
    rid = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=2))
    assert len(engine.run_to_completion([rid])[0].token_ids) <= 2
    with pytest.raises(ValueError, match="request_ids"):
        engine.run_to_completion([rid])
    with pytest.raises(ValueError, match="request_ids"):
        engine.run_to_completion(["never-added"])
    rid = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=2))
    assert engine.run_to_completion([rid])[0].finished  # the engine still serves
