"""Padded decode steps on static buffers (engine/graphs.py): the bucket planner, the padded step equal to the
unpadded one bit for bit (run eagerly on the reference backend, as the CPU runs it), padding rows confined to
the scratch block, the pool never handing that block out, fallbacks, and ``TurboConfig.cuda_graphs``.

The ``gpu`` tests capture real CUDA graphs: graph == eager padded step bit for bit at every bucket, padding
rows never touching live blocks, the fallback outside the buckets, and one host sync per steady decode step
(the eager sampler after the graph, and the sampler inside the graph: engine/graph_sampler.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from hf_turbo import Engine, SamplingParams, TurboConfig
from hf_turbo.backends import FusedOps
from hf_turbo.engine.bookkeeping import plan_step
from hf_turbo.engine.graphs import DecodeGraphs, graph_buckets, is_decode_only, width_classes
from hf_turbo.testing import tiny_model

BS = 16


def _prompts(n: int) -> list[list[int]]:
    # lengths 5..40 (one to three blocks); no prompt starts with token 0, the padding rows' token
    return [[1 + (7 * i + j) % 90 for j in range(5 + (11 * i) % 36)] for i in range(n)]


def _engine(model, max_num_seqs: int = 8, **kw) -> Engine:
    backend = "triton" if next(model.parameters()).is_cuda else "reference"
    # async scheduling off: these tests schedule and run steps by hand (engine/lookahead.py has its own tests)
    config = TurboConfig(backend=backend, max_num_seqs=max_num_seqs, debug_checks=True,
                         cuda_graphs=kw.pop("cuda_graphs", False), async_scheduling=kw.pop("async_scheduling", False))
    kw.setdefault("num_blocks", 256)  # explicit: on CUDA, sizing from free memory would see earlier engines' pools
    return Engine(model, config=config.replace(block_size=BS, **kw))


def _decode_plan(engine: Engine, n: int, new: int = 3):
    """Admit ``n`` prompts, step until every one decodes, and schedule one decode step (not yet run)."""
    for p in _prompts(n):
        engine.add_request(p, SamplingParams(max_new_tokens=new + 40, min_new_tokens=new + 40))
    for _ in range(new):
        engine.step()
    plan = plan_step(engine.scheduler.schedule())
    assert len(plan.sched.scheduled) == n and is_decode_only(plan.sched.scheduled, plan.rows)
    return plan


def _rowwise(module: torch.nn.Module):
    """``module(x)`` for an nn.Linear with every token row multiplied alone: a matmul whose rows do not depend on
    the row count. The CPU's own GEMM does depend on it (here, ``F.linear`` of the first n of 8 rows equals those
    rows of the 8-row product only for n = 4 and 8), which is why padding to the bucket happens in the eager run
    as well as in the graph; with it factored out, what is left to prove is that padding leaks nothing else."""
    def linear(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.linear(x[:, i:i + 1], module.weight, module.bias) for i in range(x.shape[1])], dim=1)
    return linear


ROWWISE = FusedOps(linear=_rowwise)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality that also holds for the NaN garbage of never-written pool slots."""
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.view(as_int), b.view(as_int))


def _pools(engine: Engine) -> list[torch.Tensor]:
    return [p.clone() for p in engine.cache.key_pools + engine.cache.value_pools]


# -- the planner -------------------------------------------------------------------------------------------
def test_graph_buckets():
    assert graph_buckets(1) == [1]
    assert graph_buckets(5) == [1, 2, 4, 5]
    assert graph_buckets(8) == [1, 2, 4, 8]
    assert graph_buckets(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert graph_buckets(128)[-3:] == [112, 120, 128] and len(graph_buckets(128)) == 19
    assert graph_buckets(20) == [1, 2, 4, 8, 16, 20]
    with pytest.raises(ValueError, match="max_num_seqs"):
        graph_buckets(0)


def test_width_classes():
    assert width_classes(16, 1000) == [32, 64, 128, 256, 512, 1000]
    assert width_classes(16, 32) == [32]
    assert width_classes(16, 10) == [10]
    assert width_classes(1024, 7) == [1, 2, 4, 7]


def test_plan_picks_the_smallest_bucket_and_width():
    engine = _engine(tiny_model("llama"))
    graphs = DecodeGraphs(engine.runner, 8, 100, capture=False)
    assert graphs.plan(1, 1) == (1, 32)
    assert graphs.plan(3, 33) == (4, 64)
    assert graphs.plan(5, 100) == (8, 100)
    assert graphs.plan(9, 1) is None  # above the largest bucket
    assert graphs.plan(2, 101) is None  # wider than the widest class


def test_is_decode_only():
    engine = _engine(tiny_model("llama"))
    plan = _decode_plan(engine, 2)
    assert is_decode_only(plan.sched.scheduled, None)
    assert not is_decode_only(plan.sched.scheduled, [[0], []])
    req = plan.sched.scheduled[0][0]
    req.spec_tokens.append(3)  # a proposal under verification is not a plain decode row
    assert not is_decode_only([(req, 1)], None)
    req.spec_tokens.clear()
    assert not is_decode_only([(req, 2)], None)
    assert not is_decode_only([], None)


# -- the padded step, eagerly ------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 5, 6])
def test_padded_step_equals_unpadded_and_writes_only_the_scratch_block(n):
    engine = _engine(tiny_model("llama"))
    plan = _decode_plan(engine, n)
    engine.backend.fused_ops = lambda model, hidden: ROWWISE  # after the lean check: see _rowwise
    runner = engine.runner
    plain = runner.execute(plan.sched.scheduled, plan.rows)
    after_plain = _pools(engine)
    runner.graphs = graphs = DecodeGraphs(runner, 8, engine.pool.num_blocks, capture=False)
    scratch = engine.cache.num_blocks - 1
    for pool in engine.cache.key_pools + engine.cache.value_pools:
        pool[scratch].fill_(float("nan"))  # poisoned: padding rows must write it before reading it
    padded = runner.execute(plan.sched.scheduled, plan.rows)
    assert graphs.num_eager == 1 and graphs.plan(n, 3)[0] >= n
    assert torch.equal(padded, plain)
    for before, now in zip(after_plain, engine.cache.key_pools + engine.cache.value_pools):
        # the real rows wrote the same K/V again; nothing else changed outside the scratch block
        assert _same_bits(now[:scratch], before[:scratch])
        if graphs.plan(n, 3)[0] > n:
            assert not torch.isnan(now[scratch, 0]).any()  # the padding rows' slot
    engine.postprocess(plan, padded)
    engine.check_invariants()


def test_engine_with_padded_decode_equals_plain_engine():
    model = tiny_model("llama")
    prompts = _prompts(7) + [[3]]  # a one-token prompt: its first step is decode-shaped
    params = SamplingParams(max_new_tokens=12, min_new_tokens=12)
    plain = [o.token_ids for o in _engine(model).generate(prompts, params, use_tqdm=False)]
    engine = _engine(model)
    engine.runner.graphs = graphs = DecodeGraphs(engine.runner, 8, engine.pool.num_blocks, capture=False)
    assert [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)] == plain
    assert graphs.num_eager >= 10
    assert engine.pool.num_free == engine.pool.num_blocks


def test_fallback_outside_buckets_and_widths():
    model = tiny_model("llama")
    prompts = _prompts(4)
    params = SamplingParams(max_new_tokens=6, min_new_tokens=6)
    plain = [o.token_ids for o in _engine(model).generate(prompts, params, use_tqdm=False)]
    engine = _engine(model)
    engine.runner.graphs = small = DecodeGraphs(engine.runner, 2, engine.pool.num_blocks, capture=False)
    assert [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)] == plain
    assert small.num_eager == 0  # four sequences decode together: above the largest bucket (2)
    engine.runner.graphs = narrow = DecodeGraphs(engine.runner, 8, 2, capture=False)
    assert [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)] == plain
    assert narrow.num_eager == 0  # the prompts of 27 and 38 tokens need 3 blocks: wider than the widest class


# -- the scratch block and the config ----------------------------------------------------------------------
def test_scratch_block_is_never_handed_out():
    engine = _engine(tiny_model("llama"), num_blocks=12, enable_prefix_caching=False)
    pool = engine.pool
    assert engine.cache.num_blocks == pool.num_blocks + 1
    handed: set[int] = set()
    allocate = pool.allocate
    pool.allocate = lambda k: handed.update(out := allocate(k)) or out
    # more demand than blocks: preemptions and recomputes, every block in use at some point
    engine.generate(_prompts(6), SamplingParams(max_new_tokens=20, min_new_tokens=20), use_tqdm=False)
    assert engine.stats()["preemptions"] > 0
    assert handed == set(range(pool.num_blocks))
    assert engine.cache.num_blocks - 1 not in handed


def test_cuda_graphs_config():
    with pytest.raises(ValueError, match="cuda_graphs"):
        TurboConfig(cuda_graphs="yes")
    model = tiny_model("llama")
    assert Engine(model, config=TurboConfig(backend="reference")).runner.graphs is None  # None: off on the CPU
    with pytest.raises(ValueError, match="cuda_graphs=True.*not a CUDA device"):
        Engine(model, config=TurboConfig(backend="reference", cuda_graphs=True))


# -- CUDA graphs (gpu) -------------------------------------------------------------------------------------
def _cuda_model(dtype: torch.dtype):
    return tiny_model("llama").to("cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_equals_eager_padded_step_at_every_bucket(dtype):
    model = _cuda_model(dtype)
    for bucket in graph_buckets(24):
        for n in sorted({bucket, max(1, bucket - 1)}):
            engine = _engine(model, max_num_seqs=24)
            plan = _decode_plan(engine, n)
            runner, scratch = engine.runner, engine.cache.num_blocks - 1
            runner.graphs = DecodeGraphs(runner, 24, engine.pool.num_blocks, capture=False)
            eager = runner.execute(plan.sched.scheduled, plan.rows)
            before = _pools(engine)
            runner.graphs = graphs = DecodeGraphs(runner, 24, engine.pool.num_blocks, capture=True)
            graphed = runner.execute(plan.sched.scheduled, plan.rows)  # warm-up, capture, replay
            again = runner.execute(plan.sched.scheduled, plan.rows)  # replay only
            assert graphs.num_replays == 2 and len(graphs.graphs) == 1
            assert torch.equal(graphed, eager) and torch.equal(again, eager), (bucket, n)
            for b, now in zip(before, engine.cache.key_pools + engine.cache.value_pools):
                assert _same_bits(now[:scratch], b[:scratch]), "a padding row wrote a live block"
            engine.postprocess(plan, again)


@pytest.mark.gpu
def test_graphs_on_by_default_and_engine_tokens_unchanged():
    model = _cuda_model(torch.float32)
    prompts = _prompts(12)
    params = SamplingParams(max_new_tokens=16, min_new_tokens=16)
    eager = [o.token_ids for o in _engine(model, max_num_seqs=16).generate(prompts, params, use_tqdm=False)]
    engine = Engine(model, config=TurboConfig(max_num_seqs=16).replace(block_size=BS, num_blocks=256))  # graphs: on
    assert engine.runner.graphs is not None
    assert [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)] == eager
    assert engine.runner.graphs.num_replays > 0 and engine.runner.graphs.failed is None


@pytest.mark.gpu
def test_graph_fallback_above_the_largest_bucket():
    model = _cuda_model(torch.float32)
    engine = _engine(model, max_num_seqs=8, cuda_graphs=True)
    engine.runner.graphs = graphs = DecodeGraphs(engine.runner, 4, engine.pool.num_blocks, capture=True)
    plan = _decode_plan(engine, 6)
    engine.runner.execute(plan.sched.scheduled, plan.rows)
    assert graphs.num_replays == 0 and not graphs.graphs


def _sync_counts(engine: Engine, steps: int) -> list[int]:
    """Host synchronizations of each of the next ``steps`` engine steps (CUDA's sync debug mode)."""
    torch.cuda.synchronize()
    counts = []
    for _ in range(steps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                engine.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    return counts


@pytest.mark.gpu
def test_one_host_sync_per_steady_decode_step():
    model = _cuda_model(torch.bfloat16)
    engine = _engine(model, max_num_seqs=8, cuda_graphs=True)
    for p in _prompts(6):  # min_new_tokens: EOS suppression on the host, so the forward's graph and sample()
        engine.add_request(p, SamplingParams(max_new_tokens=30, min_new_tokens=30))
    for _ in range(6):  # prefill, then captures
        engine.step()
    counts = _sync_counts(engine, 5)
    assert engine.runner.graphs.num_replays >= 5 and engine.runner.graphs.sampler is None
    assert counts == [1] * 5, counts  # the sampled tokens' copy, nothing else


@pytest.mark.gpu
def test_one_host_sync_per_sampled_decode_step():
    """Seeded draws with every filter, sampled inside the graph (engine/graph_sampler.py)."""
    model = _cuda_model(torch.bfloat16)
    engine = _engine(model, max_num_seqs=8, cuda_graphs=True)
    kinds = [dict(), dict(temperature=0.8), dict(temperature=1.0, top_k=5), dict(temperature=1.2, top_p=0.9),
             dict(temperature=0.9, min_p=0.05), dict(temperature=1.0, top_k=40, top_p=0.8, min_p=0.01)]
    for i, (p, kw) in enumerate(zip(_prompts(6), kinds)):
        engine.add_request(p, SamplingParams(max_new_tokens=30, ignore_eos=True, seed=i, **kw))
    for _ in range(6):  # prefill, then captures
        engine.step()
    counts = _sync_counts(engine, 5)
    sampler = engine.runner.graphs.sampler
    assert sampler is not None and sampler.failed is None and sampler.num_replays >= 5
    assert counts == [1] * 5, counts  # the sampled ids' copy, nothing else
