"""The sampler inside the decode graph (engine/graph_sampler.py, sampling/static.py): ``sample_static`` on a padded
bucket gives ``sample()``'s tokens bit for bit (greedy, keyed draws, every filter and their mixes, padding rows
present), which steps qualify, that it keeps nothing between calls, and the Engine with the padded decode path
(and its sampler) equal to the plain Engine.

The ``gpu`` test captures the sampler as CUDA graphs: graph tokens == ``sample()`` at every bucket and mode (the
one-sync rule for sampled steps is in test_graphs.py, next to the greedy one).
"""

from __future__ import annotations

import pytest
import torch
from test_graphs import BS, _engine, _prompts  # noqa: F401 - the decode-step helpers

from hf_turbo import Engine, SamplingParams
from hf_turbo.engine.bookkeeping import plan_step
from hf_turbo.engine.graph_sampler import GraphSampled, sample_in_graph
from hf_turbo.engine.graphs import DecodeGraphs, graph_buckets
from hf_turbo.sampling import RowState, sample, workspace
from hf_turbo.sampling.static import (
    MODE_GREEDY,
    MODE_MIN_P,
    MODE_SAMPLE,
    MODE_TOP_K,
    MODE_TOP_P,
    StaticRowParams,
    sample_static,
    static_mode,
)
from hf_turbo.testing import tiny_model

V = 1000

# one of each kind, repeated over the rows: greedy, plain draws at several temperatures, each filter alone and
# combined; top_p=0.999 on flat rows keeps more than the CPU's 256 candidates (the reference fallback there)
KINDS = [
    SamplingParams(),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.9),
    SamplingParams(temperature=0.9, min_p=0.05),
    SamplingParams(temperature=1.0, top_k=50, top_p=0.8, min_p=0.01),
    SamplingParams(temperature=2.0, top_p=0.999),
    SamplingParams(temperature=0.5, top_k=1),
    SamplingParams(temperature=1e-30),  # overflows: the T -> 0 limit
]


def _rows(n: int, kinds=KINDS, seed: int = 0) -> list[RowState]:
    return [RowState(kinds[(i + seed) % len(kinds)], position=3 + 7 * i, seed=1000 * seed + i) for i in range(n)]


def _logits(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, V, generator=g) * torch.linspace(0.05, 4.0, n)[:, None]  # flat to peaked rows
    if n > 2:
        x[2, 10:14] = x[2].max() + 1  # a four-way tie at the top
    return x


def _static_tokens(logits: torch.Tensor, rows: list[RowState], bucket: int, stale: float = 0.0) -> torch.Tensor:
    n = len(rows)
    padded = torch.full((bucket, V), stale)
    padded[:n] = logits
    params = StaticRowParams(bucket + 3, V, torch.device("cpu"))
    params.fill(rows, bucket)
    return sample_static(padded, params, static_mode(rows))[:n]


# -- sample_static against sample() -------------------------------------------------------------------------
@pytest.mark.parametrize("bucket", [1, 2, 4, 8, 16])
def test_static_sampler_equals_sample_at_each_bucket(bucket):
    for n in sorted({bucket, max(1, bucket - 1), max(1, bucket // 2)}):
        for seed in range(3):
            logits, rows = _logits(n, seed), _rows(n, seed=seed)
            want = sample(logits, rows)
            got = _static_tokens(logits, rows, bucket, stale=float(seed))
            assert torch.equal(got, want), (bucket, n, seed)


@pytest.mark.parametrize("kind", range(len(KINDS)))
def test_static_sampler_equals_sample_for_each_kind_alone(kind):
    """Each mode on its own (a mode's graph holds only the filters some row uses) and mixed with greedy rows."""
    for kinds in ([KINDS[kind]], [KINDS[kind], KINDS[0]]):
        for seed in range(4):
            logits, rows = _logits(6, seed), _rows(6, kinds, seed)
            assert torch.equal(_static_tokens(logits, rows, 8), sample(logits, rows)), (kind, seed)


def test_static_sampler_draws_differ_from_greedy():
    """A sanity check that the sampled rows really draw: over many seeds the tokens vary."""
    logits = _logits(4, 0)[3:4].repeat(32, 1) * 0.05  # a flat row
    rows = [RowState(SamplingParams(temperature=1.0), position=0, seed=s) for s in range(32)]
    assert len(set(_static_tokens(logits, rows, 32).tolist())) > 8


def test_static_mode():
    def mode(*params, **kw):
        return static_mode([RowState(p, 0, 0, **kw) for p in params])

    assert mode(SamplingParams()) == MODE_GREEDY
    assert mode(SamplingParams(), SamplingParams(temperature=1.0)) == MODE_SAMPLE
    assert mode(SamplingParams(temperature=1.0, top_k=3, top_p=0.5)) == MODE_SAMPLE | MODE_TOP_K | MODE_TOP_P
    assert mode(SamplingParams(temperature=1.0, min_p=0.1)) == MODE_SAMPLE | MODE_MIN_P
    assert mode(SamplingParams(top_k=3)) == MODE_GREEDY  # a greedy row's filters do nothing
    # rows that need the processors on the host
    assert mode(SamplingParams(repetition_penalty=1.2), history=[1, 2]) is None
    assert mode(SamplingParams(logit_bias={3: 1.0})) is None
    assert mode(SamplingParams(min_new_tokens=2, max_new_tokens=4), eos_ids=(2,)) is None
    assert mode(SamplingParams(), hook=lambda s: s) is None
    assert mode(SamplingParams(), mask=torch.zeros(32, dtype=torch.int32)) is None


def test_fill_pads_with_greedy_rows_and_checks_sizes():
    params = StaticRowParams(8, V, torch.device("cpu"))
    params.fill(_rows(3, seed=1), 8)
    v = params.views(8)
    assert (v["flags"][3:, 0] & 1).tolist() == [1] * 5 and v["temp"][3:, 0].tolist() == [1.0] * 5
    with pytest.raises(ValueError, match="bucket"):
        params.fill(_rows(5), 4)


def test_static_sampler_keeps_nothing_between_calls():
    """Nothing from the thread's reused scratch buffers (a CUDA graph must own every buffer it writes)."""
    logits, rows = _logits(6, 1), _rows(6, seed=1)
    before = dict(getattr(workspace._local, "buffers", {}))
    _static_tokens(logits, rows, 8)
    after = getattr(workspace._local, "buffers", {})
    assert set(after) == set(before) and all(after[k] is before[k] for k in before)


# -- the Engine ---------------------------------------------------------------------------------------------
def _params(i: int, **kw) -> SamplingParams:
    base = KINDS[i % len(KINDS)]
    fields = {f: getattr(base, f) for f in ("temperature", "top_k", "top_p", "min_p")}
    return SamplingParams(max_new_tokens=10 + i % 5, ignore_eos=True, seed=100 + i, **fields, **kw)


def _padded(engine: Engine) -> DecodeGraphs:
    engine.runner.graphs = DecodeGraphs(engine.runner, 8, engine.pool.num_blocks, capture=False)
    return engine.runner.graphs


def test_engine_with_the_graph_sampler_equals_plain_engine():
    model = tiny_model("llama")
    prompts = _prompts(11) + [[3]]
    params = [_params(i) for i in range(len(prompts))]
    plain = [o.token_ids for o in _engine(model).generate(prompts, params, use_tqdm=False)]
    engine = _engine(model)
    graphs = _padded(engine)
    assert [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)] == plain
    assert graphs.sampler is not None and graphs.sampler.num_eager >= 8
    assert graphs.num_eager == graphs.sampler.num_eager  # every padded forward of this load sampled on the device
    assert engine.pool.num_free == engine.pool.num_blocks


def test_steps_the_graph_sampler_cannot_take_use_the_eager_sampler():
    """Rows with logprobs, penalties, EOS suppression or collected scores: the padded forward, then sample()."""
    model = tiny_model("llama")
    prompts = _prompts(6)
    extra = [dict(logprobs=2), dict(repetition_penalty=1.3), dict(min_new_tokens=8), {}, {}, {}]
    params = [_params(i, **kw) for i, kw in enumerate(extra)]
    plain = _engine(model).generate(prompts, params, use_tqdm=False)
    engine = _engine(model)
    graphs = _padded(engine)
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert outs[0].logprobs == plain[0].logprobs
    assert graphs.num_eager > 0
    # the first three finish after 10-12 tokens; once they have, the other three sample on the device
    assert graphs.sampler is not None and 0 < graphs.sampler.num_eager < graphs.num_eager


def test_sample_in_graph_declines_without_graphs_and_outside_buckets():
    engine = _engine(tiny_model("llama"))
    for p in _prompts(3):
        engine.add_request(p, _params(1))
    engine.step()
    plan = plan_step(engine.scheduler.schedule())
    assert sample_in_graph(engine, plan) is None  # no graphs
    engine.runner.graphs = DecodeGraphs(engine.runner, 2, engine.pool.num_blocks, capture=False)
    assert sample_in_graph(engine, plan) is None  # three rows: above the largest bucket
    engine.runner.graphs = graphs = DecodeGraphs(engine.runner, 4, engine.pool.num_blocks, capture=False)
    out = sample_in_graph(engine, plan)
    assert isinstance(out, GraphSampled) and out.tokens.shape == (3,) and graphs.sampler.num_eager == 1
    engine.postprocess(plan, out)
    engine.check_invariants()


# -- CUDA graphs (gpu) -------------------------------------------------------------------------------------
def _cuda_decode_step(model, n: int, max_num_seqs: int, kinds):
    """An engine with ``n`` running requests of ``kinds`` and a scheduled decode step (not yet run)."""
    engine = _engine(model, max_num_seqs=max_num_seqs)
    for i, p in enumerate(_prompts(n)):
        base = kinds[i % len(kinds)]
        engine.add_request(p, SamplingParams(max_new_tokens=40, ignore_eos=True, seed=7 + i, top_k=base.top_k,
                                             temperature=base.temperature, top_p=base.top_p, min_p=base.min_p))
    for _ in range(3):
        engine.step()
    return engine, plan_step(engine.scheduler.schedule())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_sampler_equals_eager_sample_at_every_bucket(dtype):
    model = tiny_model("llama").to("cuda", dtype)
    for bucket in graph_buckets(24):
        n = max(1, bucket - 1)
        for kinds in (KINDS[:1], KINDS[:2], KINDS):  # greedy, plain draws, every filter
            engine, plan = _cuda_decode_step(model, n, 24, kinds)
            runner = engine.runner
            runner.graphs = DecodeGraphs(runner, 24, engine.pool.num_blocks, capture=False)
            logits = runner.execute(plan.sched.scheduled, plan.rows)  # the eager padded forward
            want = sample(logits, plan.row_states())
            runner.graphs = graphs = DecodeGraphs(runner, 24, engine.pool.num_blocks, capture=True)
            first = sample_in_graph(engine, plan).result().tokens  # captures both graphs, replays them
            again = sample_in_graph(engine, plan).result().tokens  # replays only
            sampler = graphs.sampler
            assert sampler.failed is None and graphs.failed is None
            assert sampler.num_replays == 2 and len(sampler.graphs) == 1
            assert torch.equal(first, want) and torch.equal(again, want), (bucket, len(kinds))
