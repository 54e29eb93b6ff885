"""Async scheduling (engine/lookahead.py): step N+1 is scheduled and queued before step N's sampled tokens reach
the host, and the tokens are the synchronous engine's, whatever finishes, arrives, aborts or is preempted.

On the CPU the decode steps run through ``DecodeGraphs(capture=False)`` (the padded graph path, eagerly) and the
graph sampler, as on CUDA without the capture; the device buffers are host tensors, so these tests check the
scheduling and bookkeeping, and the ``gpu`` test checks the same on real streams (CUDA graphs, one wait per step).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_async_engine import assert_no_leak, collect, run
from test_graphs import _prompts, _sync_counts

from hf_turbo import Engine, SamplingParams, SpeculativeConfig, TurboConfig
from hf_turbo.cache.block_pool import BlockPool
from hf_turbo.engine import AsyncEngine
from hf_turbo.engine.graphs import DecodeGraphs
from hf_turbo.engine.lookahead import PENDING, InFlight, Lookahead
from hf_turbo.engine.request import Request, RequestStatus
from hf_turbo.engine.scheduler import Scheduler
from hf_turbo.serve.metrics import Metrics
from hf_turbo.testing import tiny_model

BS = 16


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _engine(model, tokenizer=None, ahead: bool = False, max_num_seqs: int = 8, max_blocks: int | None = None,
            **kw) -> Engine:
    config = TurboConfig(backend="reference", max_num_seqs=max_num_seqs, debug_checks=True, cuda_graphs=False,
                         async_scheduling=ahead)
    kw.setdefault("num_blocks", 256)
    kw.setdefault("block_size", BS)
    engine = Engine(model, tokenizer, config=config.replace(**kw))
    if ahead:  # the padded decode path, as CUDA graphs run it, eagerly
        engine.runner.graphs = DecodeGraphs(engine.runner, max_num_seqs, max_blocks or engine.pool.num_blocks,
                                            capture=False)
    return engine


def _params(i: int, **kw) -> SamplingParams:
    sampled = dict(temperature=0.8 + 0.1 * (i % 3), top_k=(0, 20, 5)[i % 3], top_p=(1.0, 0.9, 1.0)[i % 3])
    return SamplingParams(**{"max_new_tokens": 8 + i % 9, "seed": 100 + i, **(sampled if i % 2 else {}), **kw})


def _drive(engine: Engine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]],
           abort_at: dict[int, int] | None = None) -> dict[str, list[int]]:
    """Step until idle; before step s add ``arrivals[s]`` and abort the ``abort_at[s]``-th request added."""
    ids, done, s = [], {}, 0
    while s <= max(arrivals) or engine.has_unfinished():
        for prompt, params in arrivals.get(s, []):
            ids.append(engine.add_request(prompt, params))
        if abort_at and s in abort_at:
            out = engine.abort(ids[abort_at[s]])
            assert out is not None and PENDING not in out.token_ids
            done[out.request_id] = ("abort", out.token_ids)
        for out in engine.step():
            assert PENDING not in out.token_ids
            if out.finished:
                done[out.request_id] = (out.finish_reason, out.token_ids)
        s += 1
    assert_no_leak(engine)
    return {rid: done[rid] for rid in ids}


# -- the scheduler's part ------------------------------------------------------------------------------------
def test_schedule_skipping_a_running_request():
    sched = Scheduler(BlockPool(16, 4), max_num_seqs=4, max_num_batched_tokens=64)
    reqs = [Request(f"r{i}", [1, 2, 3], SamplingParams(), 0) for i in range(3)]
    for r in reqs[:2]:
        sched.add(r)
    sched.commit(sched.schedule())
    for r in reqs[:2]:
        r.token_ids.append(7)
    sched.add(reqs[2])
    out = sched.schedule(skip={reqs[0]})
    assert [(r.request_id, n) for r, n in out.scheduled] == [("r1", 1), ("r2", 3)]  # r0 skipped, r2 admitted
    assert reqs[0].status is RequestStatus.RUNNING and not sched.waiting
    sched.commit(out)
    for r in reqs[1:]:
        r.token_ids.append(7)
    out = sched.schedule()
    assert [(r.request_id, n) for r, n in out.scheduled] == [("r0", 1), ("r1", 1), ("r2", 1)]


# -- same tokens as the synchronous engine --------------------------------------------------------------------
def test_equals_synchronous_engine_with_stops_and_sampling(llama):
    """Greedy and seeded draws, EOS-like stop ids that end rows mid-flight, different lengths."""
    prompts = _prompts(12)
    params = [_params(i, stop_token_ids=[5, 17, 23]) for i in range(12)]
    sync = [(o.finish_reason, o.token_ids) for o in _engine(llama).generate(prompts, params, use_tqdm=False)]
    engine = _engine(llama, ahead=True)
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert [(o.finish_reason, o.token_ids) for o in outs] == sync
    assert any(r == "stop" for r, _ in sync) and any(r == "length" for r, _ in sync)
    la = engine.lookahead
    assert la.num_ahead >= 10 and engine.stats()["steps_launched_ahead"] == la.num_ahead
    assert la.inflight is None
    assert_no_leak(engine)


def test_greedy_equals_stock_generate(llama):
    prompts = _prompts(4)
    engine = _engine(llama, ahead=True)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        stock = llama.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert o.token_ids == stock[0, len(p):].tolist()
    assert engine.lookahead.num_ahead >= 8


def test_stop_strings_and_text(fixture_pair):
    model, tok = fixture_pair
    prompts = ["def main():\n    ", "import os\nimport sys\n", "class Foo(object):", "# hello"]
    params = [SamplingParams(max_new_tokens=24, stop=["\n", "):"][: 1 + i % 2], seed=i, temperature=0.0 if i % 2
                             else 0.9) for i in range(4)]
    sync = _engine(model, tok).generate(prompts, params, use_tqdm=False)
    engine = _engine(model, tok, ahead=True)
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert [(o.token_ids, o.text, o.finish_reason) for o in outs] == \
        [(o.token_ids, o.text, o.finish_reason) for o in sync]
    assert engine.lookahead.num_ahead > 0


def test_arrivals_prefix_hits_and_aborts(llama):
    """Requests arrive while others decode (their admission waits for the in-flight step), share prefixes
    (prefix-cache hits on blocks committed by in-flight steps) and are aborted while a step runs."""
    shared = list(range(30, 70))
    arrivals = {0: [(shared + [1, 2], _params(0)), (_prompts(3)[2], _params(1))],
                3: [(shared + [3], _params(2)), (shared[:20] + [9, 9], _params(3))],
                7: [(shared + [1, 2, 5], _params(4)), (_prompts(9)[8], _params(5))],
                12: [(shared + [4], _params(6, max_new_tokens=20))]}
    aborts = {5: 1, 9: 2}
    sync = _drive(_engine(llama), arrivals, aborts)
    engine = _engine(llama, ahead=True)
    ahead = _drive(engine, arrivals, aborts)
    for (reason, tokens), (sync_reason, sync_tokens) in zip(ahead.values(), sync.values()):
        if sync_reason == "abort":  # the abort lands between steps: the synchronous engine is a step further
            assert reason == "abort" and sync_tokens[:len(tokens)] == tokens and len(sync_tokens) - len(tokens) <= 1
        else:
            assert (reason, tokens) == (sync_reason, sync_tokens)
    assert engine.pool.prefix_hits > 0
    assert engine.lookahead.num_ahead > 0 and engine.lookahead.num_waits > 0


def test_chunked_prefills_and_host_sampled_requests_arriving_mid_flight(llama):
    """Prompts longer than the step budget (their chunks run in steps queued ahead beside decode rows taken from the
    device), a request that samples on the host (repetition penalty, logprobs: its steps wait), one that wants a
    single token: the synchronous engine's tokens and logprobs."""
    long = [[1 + (11 * i + j) % 95 for j in range(70 + 9 * i)] for i in range(3)]
    arrivals = {0: [(p, _params(i, ignore_eos=True)) for i, p in enumerate(_prompts(4))],
                2: [(long[0], _params(5, max_new_tokens=12, ignore_eos=True))],
                4: [(long[1], _params(6, max_new_tokens=10, repetition_penalty=1.3))],
                6: [(_prompts(7)[6], _params(7, max_new_tokens=1))],
                8: [(long[2], _params(8, max_new_tokens=9, logprobs=2))],
                11: [(_prompts(9)[8], _params(9, max_new_tokens=14))]}
    kw = dict(max_num_batched_tokens=32)
    sync_engine = _engine(llama, **kw)
    sync = _drive(sync_engine, arrivals)
    engine = _engine(llama, ahead=True, **kw)
    assert _drive(engine, arrivals) == sync
    mixed = engine.runner.graphs.sampler.num_static_eager
    assert mixed > 5 and engine.lookahead.num_ahead > 10 and engine.lookahead.num_waits > 0


def test_preemption_in_the_ahead_schedule(llama):
    """Four rows reach a new block in the same step with too few blocks free: the schedule made ahead of the
    in-flight step preempts (the victim's pending token lands while it waits), the tokens stay."""
    prompts = [[1 + (5 * i + j) % 90 for j in range(15)] for i in range(4)]
    params = [_params(i, max_new_tokens=40, ignore_eos=True) for i in range(4)]
    kw = dict(num_blocks=10, max_num_seqs=4)
    sync = [o.token_ids for o in _engine(llama, **kw).generate(prompts, params, use_tqdm=False)]
    engine = _engine(llama, ahead=True, **kw)
    preempted_ahead = []
    plan_ahead = engine.lookahead._plan_ahead

    def watched(cur):
        before = engine.scheduler.num_preemptions
        planned = plan_ahead(cur)
        preempted_ahead.append(engine.scheduler.num_preemptions - before)
        return planned

    engine.lookahead._plan_ahead = watched
    assert [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)] == sync
    assert sum(preempted_ahead) > 0 and engine.lookahead.num_ahead > 0


def test_queue_waiting_for_blocks_does_not_stop_steps_ahead(llama):
    """More requests than the pool holds: while the queue waits for blocks, the decode steps still go ahead, and
    admissions (planned ahead, run after the wait) keep the synchronous engine's tokens."""
    prompts = [[1 + (3 * i + j) % 90 for j in range(30)] for i in range(10)]
    params = [_params(i, max_new_tokens=20 + 3 * i, ignore_eos=True) for i in range(10)]
    kw = dict(num_blocks=12, max_num_seqs=8)  # three rows of 30 + 50 tokens at a time
    sync = [o.token_ids for o in _engine(llama, **kw).generate(prompts, params, use_tqdm=False)]
    engine = _engine(llama, ahead=True, **kw)
    queued_ahead = []
    run_ahead = engine.lookahead._run_ahead

    def watched(plan, cur, rows):
        sampled = run_ahead(plan, cur, rows)
        queued_ahead.append(sampled is not None and bool(engine.scheduler.waiting))
        return sampled

    engine.lookahead._run_ahead = watched
    assert [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)] == sync
    assert sum(queued_ahead) >= 20  # steps queued ahead while requests waited
    assert engine.lookahead.num_waits > 0  # the admissions


def test_ahead_step_the_graph_sampler_cannot_take_runs_after_the_wait(llama):
    """Tables wider than the widest graph: the step planned ahead runs once the previous tokens are known."""
    prompts = [p[:6] for p in _prompts(5)]
    params = [_params(i, max_new_tokens=40, ignore_eos=True) for i in range(5)]
    sync = [o.token_ids for o in _engine(llama).generate(prompts, params, use_tqdm=False)]
    engine = _engine(llama, ahead=True, max_blocks=2)  # 32 positions: rows outgrow the graphs mid-generation
    assert [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)] == sync
    la = engine.lookahead
    assert la.num_ahead > 0 and la.num_waits > 0


def test_sliding_window_release(llama):
    model = tiny_model("mistral")
    prompts = [p[:9] for p in _prompts(4)]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    kw = dict(block_size=4, sliding_release=True, max_num_batched_tokens=16)
    sync = [o.token_ids for o in _engine(model, **kw).generate(prompts, params, use_tqdm=False)]
    engine = _engine(model, ahead=True, **kw)
    assert engine.cache.sliding is not None
    assert [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)] == sync
    assert engine.lookahead.num_ahead > 20
    assert engine.cache.sliding.num_held == 0


def test_failing_ahead_forward_aborts_its_rows_and_the_engine_keeps_serving(llama, monkeypatch):
    engine = _engine(llama, ahead=True)
    prompts = _prompts(4)
    ids = [engine.add_request(p, _params(i, max_new_tokens=12 + 4 * i, ignore_eos=True))
           for i, p in enumerate(prompts)]
    for _ in range(3):
        engine.step()
    assert engine.lookahead.inflight is not None
    sampler = engine.runner.graphs.sampler
    real = sampler.run
    monkeypatch.setattr(sampler, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device fault")))
    with pytest.raises(RuntimeError, match="device fault"):
        engine.step()
    assert not engine.requests and engine.lookahead.inflight is None  # every row was in the failed step
    assert_no_leak(engine)
    monkeypatch.setattr(sampler, "run", real)
    later = engine.generate(prompts[:2], SamplingParams(max_new_tokens=6), use_tqdm=False)
    assert [len(o.token_ids) for o in later] == [6, 6] and all(i not in engine.requests for i in ids)


def test_interrupt_while_waiting_and_a_raising_stop_rule_keep_every_token(llama, monkeypatch):
    """The in-flight step's progress is committed before its tokens arrive: a KeyboardInterrupt during the wait,
    or a caller's stop rule raising for one row, still gives every row its token, and stepping on afterwards
    gives the synchronous engine's tokens."""
    prompts = _prompts(5)
    params = [_params(i, max_new_tokens=16, ignore_eos=True) for i in range(5)]
    sync = [o.token_ids for o in _engine(llama).generate(prompts, params, use_tqdm=False)]
    engine = _engine(llama, ahead=True)
    calls = {"rule": 0, "wait": 0}

    def rule(output_ids):
        calls["rule"] += 1
        if calls["rule"] == 8:
            raise RuntimeError("a stop rule failed")
        return False

    wait = InFlight.wait

    def interrupted(self):
        calls["wait"] += 1
        if calls["wait"] == 4:
            raise KeyboardInterrupt
        return wait(self)

    monkeypatch.setattr(InFlight, "wait", interrupted)
    ids = [engine.add_request(p, sp, stop_checker=rule if i == 2 else None)
           for i, (p, sp) in enumerate(zip(prompts, params))]
    done, raised = {}, []
    while engine.has_unfinished():
        try:
            outs = engine.step()
        except (KeyboardInterrupt, RuntimeError) as exc:
            raised.append(type(exc).__name__)
            continue
        done.update((o.request_id, o.token_ids) for o in outs if o.finished)
    assert sorted(raised) == ["KeyboardInterrupt", "RuntimeError"]
    assert [done[i] for i in ids] == sync
    assert_no_leak(engine)


def test_async_engine_streams_the_same_tokens(fixture_pair):
    model, tok = fixture_pair
    prompts = ["def main():\n    ", "import os\n", "class Foo(object):", "x = 1\n"]
    params = [SamplingParams(max_new_tokens=n, seed=n, temperature=0.7) for n in (8, 14, 6, 12)]
    sync = _engine(model, tok).generate(prompts, params, use_tqdm=False)

    async def main():
        eng = AsyncEngine(model, tok, num_blocks=128, backend="reference", async_scheduling=True)
        eng.engine.runner.graphs = DecodeGraphs(eng.engine.runner, 8, eng.engine.pool.num_blocks, capture=False)
        async with eng:
            res = await asyncio.gather(*(collect(eng, p, sp, delay=0.02 * i)
                                         for i, (p, sp) in enumerate(zip(prompts, params))))
        return res, eng.engine, eng.stats()

    res, engine, stats = run(main())
    for (tokens, texts, last), r in zip(res, sync):
        assert tokens == r.token_ids and last.output.text == r.text == "".join(texts)
    assert engine.lookahead.num_ahead > 0
    text = Metrics().render(stats, "fixture")  # the server's /metrics
    assert f"hf_turbo_engine_steps_launched_ahead_total {engine.lookahead.num_ahead}" in text
    assert_no_leak(engine)


# -- configuration ------------------------------------------------------------------------------------------
def test_async_scheduling_setting(llama):
    with pytest.raises(ValueError, match="async_scheduling"):
        TurboConfig(async_scheduling="yes")
    assert _engine(llama).lookahead is None  # off
    default = Engine(llama, config=TurboConfig(backend="reference").replace(num_blocks=64))
    assert default.config.async_scheduling is None and default.lookahead is None  # None: on with CUDA graphs only
    assert isinstance(_engine(llama, ahead=True).lookahead, Lookahead)
    spec = SpeculativeConfig(method="ngram", num_tokens=2)
    with pytest.raises(ValueError, match="async_scheduling=True cannot be honoured: speculative"):
        Engine(llama, config=TurboConfig(backend="reference", speculative=spec, async_scheduling=True))
    assert Engine(llama, config=TurboConfig(backend="reference", speculative=spec)).lookahead is None


def test_in_flight_copy_is_the_host_list():
    tokens = torch.tensor([4, 8, 15])
    step = InFlight.detach(None, type("S", (), {"tokens": tokens})())
    tokens[0] = 99  # a later step overwriting the buffer does not reach the copy
    assert step.wait() == [4, 8, 15]


# -- CUDA -----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_async_scheduling_equals_synchronous_with_one_wait_per_step(dtype):
    """CUDA graphs with the sampler inside them: tokens equal the synchronous engine's, every steady step is
    launched ahead, and a step's only wait for the device is its sampled tokens' (no other sync)."""
    model = tiny_model("llama").to("cuda", dtype)
    prompts = _prompts(12)
    params = [_params(i, max_new_tokens=24, stop_token_ids=[5, 17]) for i in range(12)]

    def make(ahead):
        config = TurboConfig(backend="triton", max_num_seqs=16, debug_checks=True, cuda_graphs=True,
                             async_scheduling=ahead)
        return Engine(model, config=config.replace(block_size=BS, num_blocks=256))

    sync = [o.token_ids for o in make(False).generate(prompts, params, use_tqdm=False)]
    engine = make(None)  # the default on CUDA with graphs
    assert isinstance(engine.lookahead, Lookahead)
    assert [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)] == sync
    assert engine.lookahead.num_ahead > 10 and engine.runner.graphs.sampler.num_replays > 10
    assert_no_leak(engine)

    for i, p in enumerate(prompts[:6]):
        engine.add_request(p, SamplingParams(max_new_tokens=40, ignore_eos=True, seed=i, temperature=0.8))
    for _ in range(6):
        engine.step()
    waits, wait = [], InFlight.wait

    def counted(self):  # the step's one wait, outside the sync debug mode
        waits.append(1)
        torch.cuda.set_sync_debug_mode("default")
        try:
            return wait(self)
        finally:
            torch.cuda.set_sync_debug_mode("warn")

    InFlight.wait = counted
    try:
        counts = _sync_counts(engine, 5)
    finally:
        InFlight.wait = wait
    assert counts == [0] * 5 and len(waits) == 5, (counts, waits)


def test_benchmark_script_runs_and_finds_equal_tokens(capsys):
    """benchmarks/bench_lookahead.py at tiny sizes: both workloads, steps launched ahead, tokens equal."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lookahead.py"
    spec = importlib.util.spec_from_file_location("bench_lookahead", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--layers", "1", "--requests", "6", "--max-seqs", "4", "--every", "3",
                       "--new-tokens", "6,12"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| offline") or
            line.startswith("| arrivals")]
    assert len(rows) == 3 and all(row.endswith("| yes |") for row in rows), rows
    assert all(int(row.split("|")[3].split()[0]) > 0 for row in rows), rows  # steps launched ahead
