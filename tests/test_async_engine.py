"""AsyncEngine: streaming equals the offline Engine, aborts free blocks, errors stay per request.

Each test runs its coroutine with ``asyncio.run`` under an ``asyncio.wait_for`` bound, so a hang
fails the test instead of blocking the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest

from hf_turbo.backends.cpu import vmem
from hf_turbo.engine import AsyncEngine, EngineOverloaded, StreamOutput
from hf_turbo.engine.detokenizer import IncrementalDetokenizer
from hf_turbo.engine.engine import Engine
from hf_turbo.sampling import SamplingParams
from hf_turbo.testing import tiny_model

TIMEOUT = 60.0
MULTIBYTE = "héllo wörld ✓ 日本語 ça va? ünïcødé €"


def run(coro, timeout: float = TIMEOUT):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


def reference(model, prompts, params, tokenizer=None, **overrides):
    return Engine(model, tokenizer, num_blocks=512, **overrides).generate(prompts, params, use_tqdm=False)


async def collect(eng: AsyncEngine, prompt, params, request_id=None, delay: float = 0.0):
    """Stream one request; returns (token ids, text deltas, last delta)."""
    if delay:
        await asyncio.sleep(delay)
    tokens, texts, last = [], [], None
    async for d in eng.generate(prompt, params, request_id):
        assert isinstance(d, StreamOutput) and not (last is not None and last.finished)
        tokens += d.token_ids
        texts.append(d.text)
        last = d
    return tokens, texts, last


async def barrier(eng: AsyncEngine) -> None:
    """Commands run in order: once this abort returns, every earlier command has run."""
    assert await eng.abort("no-such-request") is None


def assert_idle(eng: AsyncEngine) -> None:
    s = eng.stats()
    assert (s["running"], s["waiting"]) == (0, 0)
    assert s["kv_blocks_free"] == s["kv_blocks_total"]


def assert_no_leak(engine: Engine) -> None:
    assert engine.pool.num_free == engine.pool.num_blocks
    assert not engine.requests and not engine.has_unfinished()
    engine.check_invariants()


def random_prompts(n: int, seed: int, vocab: int = 512):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(3, 16))] for _ in range(n)]
    params = [SamplingParams(max_new_tokens=rng.randint(8, 24)) for _ in range(n)]
    return prompts, params


class ScriptedLogits:
    """Wraps a runner's execute so that greedy decoding spells ``script`` (token ids) over and over."""

    def __init__(self, runner, script: list[int]) -> None:
        self.execute, self.script = runner.execute, script

    def __call__(self, scheduled, logit_rows=None):
        logits = self.execute(scheduled, logit_rows).clone()  # an inference tensor: not writable
        rows = [req for req, n in scheduled if req.num_computed + n == req.num_tokens]
        for i, req in enumerate(rows):
            logits[i] = -1e4
            logits[i, self.script[req.num_output_tokens % len(self.script)]] = 1e4
        return logits


# -- 1. streaming equals Engine.generate ---------------------------------------------------------
def test_stream_matches_engine_tiny(tiny):
    prompts, params = random_prompts(8, seed=0)
    ref = reference(tiny, prompts, params)

    async def main():
        async with AsyncEngine(tiny, num_blocks=256) as eng:
            res = await asyncio.gather(*(collect(eng, p, sp, delay=0.01 * i)
                                         for i, (p, sp) in enumerate(zip(prompts, params))))
            await barrier(eng)
            assert_idle(eng)
            s = eng.stats()
            assert s["requests_submitted"] == s["requests_finished"] == len(prompts)
            assert s["tokens_streamed"] == sum(len(r.token_ids) for r in ref)
            assert s["time_to_first_token"]["count"] == len(prompts)
        assert_no_leak(eng.engine)
        return res

    for (tokens, texts, last), r in zip(run(main()), ref):
        assert tokens == r.token_ids == last.output.token_ids
        assert last.finished and last.finish_reason == r.finish_reason
        assert texts == [""] * len(texts) and last.output.text is None  # no tokenizer, no text
        assert last.output.time_to_first_token is not None


@pytest.mark.parametrize("overlap", [False, True], ids=["in-order", "overlapped"])
def test_stream_matches_engine_fixture(fixture_pair, overlap):
    model, tok = fixture_pair
    prompts = ["def main():\n    ", "import os\nimport sys\n", "class Foo(object):", "# " + MULTIBYTE]
    params = [SamplingParams(max_new_tokens=n) for n in (8, 12, 6, 12)]
    ref = reference(model, prompts, params, tok)

    async def main():
        eng = AsyncEngine(model, tok, num_blocks=128)
        eng.overlap = overlap  # on CUDA by default: a step's outputs stream while the next forward runs
        async with eng:
            return await asyncio.gather(*(collect(eng, p, sp, delay=0.02 * i)
                                          for i, (p, sp) in enumerate(zip(prompts, params))))

    for (tokens, texts, last), r in zip(run(main()), ref):
        assert tokens == r.token_ids
        assert last.output.text == r.text == "".join(texts)


# -- 2. incremental text -------------------------------------------------------------------------
def test_detokenizer_never_splits_a_character(fixture_pair):
    _, tok = fixture_pair
    ids = tok(MULTIBYTE, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == MULTIBYTE
    # the byte-level tokenizer splits some characters across tokens: the point of the test
    assert any("\ufffd" in tok.decode(ids[:k]) for k in range(1, len(ids)))
    for k in range(len(ids) + 1):
        detok = IncrementalDetokenizer(tok)
        deltas = [detok.push(ids[:k]), *(detok.push([t]) for t in ids[k:]), detok.finish()]
        assert "".join(deltas) == MULTIBYTE
        assert not any("\ufffd" in d for d in deltas), (k, deltas)
    detok = IncrementalDetokenizer(tok)
    assert [detok.push([t]) for t in ids] and detok.prefix_offset > 0  # the decode window moves on
    with pytest.raises(ValueError, match="hold_back"):
        IncrementalDetokenizer(tok, hold_back=-1)


def scripted_stream(tok, params: SamplingParams):
    """Stream one request whose greedy output spells MULTIBYTE, through the fixture tokenizer."""
    script = tok(MULTIBYTE, add_special_tokens=False)["input_ids"]
    model = tiny_model("llama", vocab_size=len(tok))

    async def main():
        async with AsyncEngine(model, tok, num_blocks=64) as eng:
            eng.engine.runner.execute = ScriptedLogits(eng.engine.runner, script)
            return await collect(eng, "x = ", params)

    return script, run(main())


@pytest.mark.parametrize("cut", [0, 18], ids=["whole", "mid-character"])
def test_stream_text_multibyte(fixture_pair, cut):
    _, tok = fixture_pair
    n = cut or len(tok(MULTIBYTE, add_special_tokens=False)["input_ids"])
    script, (tokens, texts, last) = scripted_stream(tok, SamplingParams(max_new_tokens=n))
    assert tokens == script[:n] and last.output.text == tok.decode(script[:n]) == "".join(texts)
    assert sum(bool(t) for t in texts) > 5  # really streamed, not all at the end
    if cut:  # the output ends inside a character: only the final flush may show U+FFFD
        assert last.output.text.endswith("\ufffd") and not any("\ufffd" in t for t in texts[:-1])
    else:
        assert last.output.text == MULTIBYTE and not any("\ufffd" in t for t in texts)


def test_stream_text_stop_string(fixture_pair):
    _, tok = fixture_pair
    script, (_, texts, last) = scripted_stream(tok, SamplingParams(max_new_tokens=30, stop=("wörld",)))
    assert last.finish_reason == "stop" and last.output.text == "héllo "
    assert "".join(texts) == "héllo "  # held back: nothing past the stop string was streamed


# -- 3. aborts under load ------------------------------------------------------------------------
@pytest.mark.parametrize("shared_prefix,overlap", [(False, False), (True, False), (False, True)])
def test_abort_cancel_close_under_load(tiny, shared_prefix, overlap):
    n = 100
    prompts, params = random_prompts(n, seed=1)
    overrides = {}
    if shared_prefix:  # a 64-token common prefix in blocks of one 4 KiB page per head: rows share its pages
        prefix = (random_prompts(1, seed=9)[0][0] * 64)[:64]
        prompts = [prefix + p for p in prompts]
        overrides = {"block_size": 64}
    ref = reference(tiny, prompts, params, **overrides)
    rng = random.Random(2)
    plan = []  # (action, tokens to see first): the action always comes before the request ends
    for r in ref:
        x = rng.random()
        action = "abort" if x < 0.1 else "cancel" if x < 0.2 else "close" if x < 0.3 else "full"
        n_out = len(r.token_ids)
        plan.append((action, rng.randint(1, n_out - 2)) if n_out >= 3 else ("full", 0))

    async def consumer(eng: AsyncEngine, i: int):
        await asyncio.sleep(rng.uniform(0, 0.3))
        action, k = plan[i]
        tokens, last = [], None
        async with contextlib.aclosing(eng.generate(prompts[i], params[i], f"r{i}")) as stream:
            async for d in stream:
                tokens += d.token_ids
                last = d
                if len(tokens) >= k and not d.finished:
                    if action == "abort":
                        await eng.abort(f"r{i}")
                        action = "aborted"
                    elif action == "cancel":
                        asyncio.current_task().cancel()  # raised at the next await, inside generate
                    elif action == "close":
                        break
        return tokens, last

    async def main():
        eng = AsyncEngine(tiny, num_blocks=512, **overrides)
        eng.overlap = overlap
        async with eng:
            tasks = [asyncio.create_task(consumer(eng, i)) for i in range(n)]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await barrier(eng)
            assert_idle(eng)
            s = eng.stats()
            assert s["requests_submitted"] == n == s["requests_finished"] + s["requests_aborted"]
            assert s["requests_aborted"] >= 10
            if shared_prefix:
                assert s["prefix_cache_hit_rate"] > 0
                if eng.engine.backend.name == "cpu":  # the CPU backend maps shared prefix pages
                    assert eng.engine.cache.backend_state.shares_pages or not vmem.supported()
            # finished ids are free again
            again = await asyncio.gather(*(collect(eng, prompts[i], params[i], f"r{i}") for i in range(4)))
            await barrier(eng)
            assert_idle(eng)
        assert_no_leak(eng.engine)
        return results, again

    results, again = run(main())
    for i, (res, r) in enumerate(zip(results, ref)):
        action = plan[i][0]
        if action == "cancel":
            assert isinstance(res, asyncio.CancelledError), (i, res)
            continue
        tokens, last = res
        assert tokens == r.token_ids[:len(tokens)], i
        if action == "full":
            assert tokens == r.token_ids and last.finish_reason == r.finish_reason, i
        elif action == "abort":
            assert last.finished and (last.finish_reason == "abort" or tokens == r.token_ids), i
            assert last.output.token_ids == tokens
        else:
            assert not last.finished and len(tokens) == plan[i][1], i
    for (tokens, _, last), r in zip(again, ref):
        assert tokens == r.token_ids and last.finish_reason == r.finish_reason


# -- 4. an exception inside a step ---------------------------------------------------------------
def test_step_exception_fails_only_that_step(tiny):
    prompts, params = random_prompts(6, seed=3)
    ref = reference(tiny, prompts, params)
    err = RuntimeError("injected forward failure")
    in_failed_step: set[str] = set()

    async def main():
        async with AsyncEngine(tiny, num_blocks=256, max_num_seqs=2) as eng:
            execute = eng.engine.runner.execute

            def failing(scheduled, logit_rows=None):
                if not in_failed_step and any(req.request_id == "boom" for req, _ in scheduled):
                    in_failed_step.update(req.request_id for req, _ in scheduled)
                    raise err
                return execute(scheduled, logit_rows)

            eng.engine.runner.execute = failing
            ids = ["boom" if i == 1 else f"ok{i}" for i in range(5)]
            results = await asyncio.gather(*(collect(eng, prompts[i], params[i], rid, delay=0.01 * i)
                                             for i, rid in enumerate(ids)), return_exceptions=True)
            after = await collect(eng, prompts[5], params[5])  # the engine still serves
            await barrier(eng)
            assert_idle(eng)
            assert eng.stats()["requests_failed"] == len(in_failed_step)
        assert_no_leak(eng.engine)
        return ids, results, after

    ids, results, after = run(main())
    assert "boom" in in_failed_step and len(in_failed_step) < 5  # others ran in other steps
    for i, (rid, res) in enumerate(zip(ids, results)):
        if rid in in_failed_step:
            assert res is err, rid
        else:
            assert res[0] == ref[i].token_ids, rid
    assert after[0] == ref[5].token_ids


# -- 5. bad input --------------------------------------------------------------------------------
def test_bad_input_raises_and_engine_keeps_serving(tiny):
    prompt, sp = [5, 6, 7, 8], SamplingParams(max_new_tokens=10)
    ref = reference(tiny, [prompt], [sp])[0]
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)

    async def first(agen):
        return await agen.__anext__()

    async def main():
        async with AsyncEngine(tiny, num_blocks=64) as eng:
            for bad, match in [(dict(prompt=[]), "empty"), (dict(prompt=[10**6]), "out of the vocabulary"),
                               (dict(prompt="text"), "tokenizer"), (dict(prompt=[1, 2], params="greedy"), "params")]:
                with pytest.raises(ValueError, match=match):
                    await first(eng.generate(**bad))
            long = eng.generate([1, 2, 3], SamplingParams(max_new_tokens=400, ignore_eos=True), "dup")
            await first(long)  # running now
            with pytest.raises(ValueError, match="already in use"):
                await first(eng.generate(prompt, sp, "dup"))
            await long.aclose()  # aborts it
            tokens, _, last = await collect(eng, prompt, sp, "dup")  # the id is free again
            await barrier(eng)
            assert_idle(eng)
            assert eng.stats()["requests_submitted"] == 2
        assert_no_leak(eng.engine)
        return tokens, last

    tokens, last = run(main())
    assert tokens == ref.token_ids and last.finish_reason == ref.finish_reason


# -- 6. overload ---------------------------------------------------------------------------------
def test_overload_raises_engine_overloaded(tiny):
    prompts, params = random_prompts(2, seed=4)
    ref = reference(tiny, prompts, params)
    assert issubclass(EngineOverloaded, RuntimeError)

    async def main():
        async with AsyncEngine(tiny, num_blocks=128, max_num_seqs=1, max_waiting=2) as eng:
            busy = eng.generate([1, 2, 3], SamplingParams(max_new_tokens=400, ignore_eos=True), "busy")
            await busy.__anext__()  # occupies the only running slot
            queued = [asyncio.create_task(collect(eng, p, sp)) for p, sp in zip(prompts, params)]
            await asyncio.sleep(0)  # both submit (commands run in order): two requests wait now
            with pytest.raises(EngineOverloaded, match="waiting"):
                await eng.generate([4, 5, 6], SamplingParams()).__anext__()
            await eng.abort("busy")
            assert [d async for d in busy][-1].finish_reason == "abort"
            res = await asyncio.gather(*queued)
            await barrier(eng)
            assert_idle(eng)
        return res

    for (tokens, _, _), r in zip(run(main()), ref):
        assert tokens == r.token_ids


# -- lifecycle -----------------------------------------------------------------------------------
def test_shutdown_aborts_pending_and_idles_without_spinning(tiny):
    async def main():
        eng = AsyncEngine(tiny, num_blocks=64)
        with pytest.raises(RuntimeError, match="not started"):
            await eng.generate([1, 2]).__anext__()
        await eng.start()
        await collect(eng, [1, 2, 3], SamplingParams(max_new_tokens=4))
        await asyncio.sleep(0.3)  # past OpenMP's spin-wait after the last forward
        cpu = time.process_time()
        await asyncio.sleep(0.5)  # idle: the engine thread sleeps on its event
        assert time.process_time() - cpu < 0.2
        stream = eng.generate([1, 2, 3], SamplingParams(max_new_tokens=400, ignore_eos=True))
        await stream.__anext__()
        await eng.shutdown()
        rest = [d async for d in stream]
        assert rest[-1].finished and rest[-1].finish_reason == "abort"
        with pytest.raises(RuntimeError, match="shut down"):
            await eng.generate([1, 2]).__anext__()
        assert_no_leak(eng.engine)

    run(main())
