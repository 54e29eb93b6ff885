"""Sliding-window release (issue 23, item 3; cache/sliding.py): layers attending within a sliding window keep only
the blocks their window still reads, and the output stays stock's, token for token, in float32.

Tiny models have a sliding window of 8 tokens (hf_turbo.testing); with 4-token blocks a decoding sequence may hold
at most 8 / 4 + 2 = 4 blocks per sliding layer (the issue's bound), measured here from the block map.
"""

from __future__ import annotations

import pytest
import torch

import hf_turbo
from hf_turbo import Engine, SamplingParams
from hf_turbo.cache.block_pool import BlockPool
from hf_turbo.cache.sliding import SlidingBlocks
from hf_turbo.engine.request import Request
from hf_turbo.testing import tiny_model

BS = 4
PROMPTS = [[5, 17, 3, 99, 42, 7, 250, 11, 60], [300, 2, 8], list(range(40, 75))]


def _stock(model, prompts, n):
    return [model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(p):].tolist()
            for p in prompts]


def _engine(model, **overrides) -> Engine:
    base = dict(block_size=BS, max_num_batched_tokens=16, max_num_seqs=4, sliding_release=True, debug_checks=True)
    return Engine(model, config=hf_turbo.TurboConfig().replace(**{**base, **overrides}))


def _run(engine, prompts, n, each_step=None) -> list[list[int]]:
    # min_new_tokens as stock's: EOS suppressed, not only ignored (tiny cohere2 reaches EOS as its argmax; with
    # ignore_eos the request has no EOS ids for min_new_tokens to suppress)
    params = SamplingParams(max_new_tokens=n, min_new_tokens=n)
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        if each_step is not None:
            each_step(engine)
    return [done[i] for i in ids]


def _assert_all_free(engine):
    engine.check_invariants()
    assert engine.pool.num_free == engine.pool.num_blocks
    assert engine.cache.sliding.num_held == 0


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text", "cohere2", "olmo3", "exaone4"])
def test_long_generation_holds_only_the_window(family):
    model = tiny_model(family)
    n = 48  # six windows
    stock = _stock(model, PROMPTS, n)
    engine = _engine(model)
    sliding = engine.cache.sliding
    assert sliding is not None and sliding.window == 8
    full = [i for i in range(engine.cache.num_layers) if i not in sliding.layers]
    assert (len(full) > 0) == (family != "mistral")  # mistral: every layer slides; gemma, cohere2: mixed
    # the sliding layers' pools are sized for 4 running windows, not for the engine's blocks
    for i in sliding.layers:
        assert engine.cache.layer_pools(i)[0].shape[0] == sliding.num_physical + 1 < engine.cache.num_blocks
    for i in full:
        assert engine.cache.layer_pools(i)[0].shape[0] == engine.cache.num_blocks
    most = []

    def check(eng):
        for req in eng.scheduler.running:
            if req.num_computed > req.num_prompt_tokens:  # decoding
                most.append(sliding.held(req))
                assert sliding.held(req) <= sliding.window / BS + 2
                assert len(req.block_ids) > sliding.held(req) or req.num_computed <= 2 * sliding.window

    assert _run(engine, PROMPTS, n, check) == stock
    assert most and max(most) <= 8 / BS + 2
    _assert_all_free(engine)


def test_prefix_hits_after_release_stay_exact():
    """A second request sharing a long prefix: while the first still decodes (its window blocks held) and after
    it finished (released blocks left in the prefix cache as evictable, or gone): stock's tokens either way."""
    model = tiny_model("gemma2")
    shared = list(range(100, 140))  # 10 blocks, five windows
    a, b = shared + [7, 8, 9], shared + [11, 12]
    stock = _stock(model, [a, b], 12)
    engine = _engine(model)
    params = SamplingParams(max_new_tokens=12, min_new_tokens=12)
    assert _run(engine, [a], 12) == stock[:1]
    after = engine.run_to_completion([engine.add_request(b, params)])  # after a finished
    assert after[0].token_ids == stock[1]
    # a's last window before the shared prefix's end was left evictable: b took the whole prefix
    assert after[0].num_cached_tokens == len(shared)
    engine.pool.reset_prefix_cache()
    # concurrently: b admitted while a decodes (a's window holds the blocks b's window needs)
    ra = engine.add_request(a, params)
    for _ in range(4):
        engine.step()
    outs = engine.run_to_completion([ra, engine.add_request(b, params)])
    assert [o.token_ids for o in outs] == stock
    assert outs[1].num_cached_tokens == len(shared)
    _assert_all_free(engine)


def test_preemption_and_speculation_stay_exact():
    model = tiny_model("mistral")
    prompts = PROMPTS + [list(range(200, 230)), [9] * 20]
    stock = _stock(model, prompts, 24)
    engine = _engine(model, num_blocks=24, max_num_seqs=5)  # too few engine blocks for all five: preemption
    assert _run(engine, prompts, 24) == stock
    assert engine.scheduler.num_preemptions > 0
    _assert_all_free(engine)
    spec = hf_turbo.SpeculativeConfig(method="ngram", num_tokens=3)
    engine = _engine(model, speculative=spec)
    assert _run(engine, [[1, 2, 3, 4] * 6, PROMPTS[2]], 24) == _stock(model, [[1, 2, 3, 4] * 6, PROMPTS[2]], 24)
    _assert_all_free(engine)


def test_resolution_and_refusals():
    model = tiny_model("mistral")
    # default on the CPU: the CPU backend keeps every position in its rows, so nothing is released
    engine = Engine(model, config=hf_turbo.TurboConfig().replace(block_size=BS))
    assert engine.cache.sliding is None and engine.backend.name == "cpu"
    engine = Engine(model, config=hf_turbo.TurboConfig().replace(block_size=BS, backend="reference"))
    assert engine.cache.sliding is not None  # default on where the backend reads the pools
    engine = Engine(model, config=hf_turbo.TurboConfig().replace(block_size=BS, backend="reference",
                                                                 sliding_release=False))
    assert engine.cache.sliding is None
    engine = _engine(model)
    assert engine.backend.name == "reference"  # True on the CPU: the reference backend
    assert engine.runner.graphs is None
    kv = [(torch.zeros(3, 1, 8), torch.zeros(3, 1, 8))] * engine.cache.num_layers
    with pytest.raises(ValueError, match="sliding_release"):
        engine.add_request(PROMPTS[0], kv_import=kv)
    assert _engine(tiny_model("llama")).cache.sliding is None  # no sliding layer: nothing to release
    with pytest.raises(ValueError, match="sliding_release"):
        hf_turbo.CacheConfig(sliding_release="yes")
    accelerated = hf_turbo.accelerate(tiny_model("mistral"))  # generate() hands back full HF caches
    try:
        assert accelerated._hf_turbo.config.cache.sliding_release is False
    finally:
        hf_turbo.restore(accelerated)


def _req(rid: str, blocks: list[int], computed: int) -> Request:
    req = Request(request_id=rid, prompt_ids=list(range(computed + 1)), params=SamplingParams(), seed=0)
    req.block_ids, req.num_computed = blocks, computed
    return req


def test_block_map_holds_evicts_and_forgets_reused_blocks():
    pool = BlockPool(16, 4)
    sliding = SlidingBlocks(pool, 16, 8, window=8, layers=[0], max_num_batched_tokens=8)
    sliding.copy_layer = lambda src, dst: None
    blocks = pool.allocate(5)
    req = _req("a", blocks, 0)
    sliding.plan([(req, 20)])  # a 20-token prefill writes all 5 blocks
    assert sliding.held(req) == 5 and all(sliding.table[b] != sliding.scratch for b in blocks)
    req.num_computed = 20
    sliding.plan([(req, 1)])  # decode at 20 reads 13..20: blocks 3, 4, 5
    assert sliding.held(req) == 2 and sliding.table[blocks[0]] == sliding.scratch
    pool.cache_block(blocks[3], b"h3")
    sliding.release(req)
    assert sliding.num_held == 0
    assert sliding.table[blocks[3]] != sliding.scratch  # in the prefix cache: kept, evictable
    assert sliding.table[blocks[4]] == sliding.scratch  # not cached: freed
    # a prefix hit over blocks 0..3 can take only what still has sliding K/V before its end
    assert sliding.usable_prefix(blocks[:4]) == 0
    assert sliding.usable_prefix(blocks[:1]) == 0
    sliding.check_invariants()
    # the engine block is handed out again: its old K/V are not the new owner's
    pool.free(reversed(blocks))
    pool.reset_prefix_cache()
    again = pool.allocate(16)
    fresh = _req("b", again, 0)
    sliding.plan([(fresh, 8)])
    assert sliding.held(fresh) == 2
    sliding.check_invariants()
    with pytest.raises(RuntimeError, match="released"):
        late = _req("c", again[4:8], 12)  # positions 5..11 were never written under this generation
        sliding.plan([(late, 1)])


def test_int8_cache_releases_too():
    """An 8-bit cache's scale pools follow their layer's blocks: release changes none of its tokens."""
    model = tiny_model("gemma2")
    kept = _run(_engine(model, kv_dtype="int8", sliding_release=False), PROMPTS, 32)
    engine = _engine(model, kv_dtype="int8")
    assert engine.cache.sliding is not None
    assert all(engine.cache.layer_scales(i)[0].shape[0] == engine.cache.sliding.num_physical + 1
               for i in engine.cache.sliding.layers)
    assert _run(engine, PROMPTS, 32) == kept
    _assert_all_free(engine)


def test_padded_decode_steps_map_the_sliding_tables():
    """The CUDA-graph decode path (engine/graphs.py, run eagerly padded on the CPU) moves the holds and maps the
    sliding layers' slots and tables into its static buffers: same tokens as the plain engine."""
    from hf_turbo.engine.graphs import DecodeGraphs

    model = tiny_model("mistral")  # a family with a lean forward (graphs replay only that)
    prompts = [p[:6] for p in PROMPTS] + [[3]]
    plain = _run(_engine(model), prompts, 40)
    engine = _engine(model)
    engine.runner.graphs = graphs = DecodeGraphs(engine.runner, 8, engine.pool.num_blocks, capture=False)
    assert _run(engine, prompts, 40) == plain
    assert graphs.num_eager >= 30
    _assert_all_free(engine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_release_with_graphs_equals_keeping_every_block():
    """On the GPU (Triton kernels, CUDA graphs captured with the sliding tables): the same tokens as an engine that
    keeps every block, in float32."""
    model = tiny_model("mistral").cuda()
    kw = dict(block_size=16, max_num_seqs=8, num_blocks=256, backend="triton")
    kept = Engine(model, config=hf_turbo.TurboConfig().replace(sliding_release=False, cuda_graphs=False, **kw))
    want = _run(kept, PROMPTS, 48)
    engine = Engine(model, config=hf_turbo.TurboConfig().replace(sliding_release=True, cuda_graphs=True, **kw))
    assert engine.cache.sliding is not None and engine.runner.graphs is not None
    assert _run(engine, PROMPTS, 48) == want
    assert engine.runner.graphs.num_replays > 0
    _assert_all_free(engine)
