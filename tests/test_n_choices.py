"""``SamplingParams(n=...)``: n samples of one prompt share its full KV blocks (reference-counted) and copy
its last partial block (copy-on-write), each has its own key (seed + i), a seeded request's samples are
reproducible and equal to the same request sent alone with that sample's seed, and no block leaks."""

from __future__ import annotations

import pytest
import torch

import hf_turbo
from hf_turbo.sampling import SamplingParams
from hf_turbo.testing import tiny_model

PROMPT = list(range(5, 45))  # 40 tokens: 2 full blocks of 16 and a partial one


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_samples_seeds_and_add_request_refuses_n(model):
    p = SamplingParams(n=3, seed=7, temperature=1.0)
    assert [s.seed for s in p.samples()] == [7, 8, 9] and all(s.n == 1 for s in p.samples())
    assert [s.seed for s in SamplingParams(n=2).samples()] == [None, None]
    eng = hf_turbo.Engine(model, None, num_blocks=32)
    with pytest.raises(ValueError, match="SamplingParams.n"):
        eng.add_request(PROMPT, p)
    assert not eng.requests


def test_n_samples_share_the_prompt_blocks_without_leaks(model):
    eng = hf_turbo.Engine(model, None, num_blocks=64, debug_checks=True)
    ids = [eng.add_request(PROMPT, s) for s in SamplingParams(n=4, seed=3, temperature=1.0, max_new_tokens=6).samples()]
    eng.step()  # the first sample's prefill; the others wait for its blocks
    eng.step()
    reqs = [eng.requests[i] for i in ids]
    assert all(r.status.value == "running" for r in reqs)
    shared = reqs[0].block_ids[:2]
    assert all(r.block_ids[:2] == shared for r in reqs)  # the full prompt blocks: one copy
    assert [eng.pool.ref_counts[b] for b in shared] == [4, 4]
    assert len({r.block_ids[2] for r in reqs}) == 4  # each its own last (partial) block
    assert eng.pool.num_used == 2 + 4
    # copy-on-write: the partial block was copied from the first sample, only the last prompt token computed
    assert all(r.num_cached_tokens == len(PROMPT) - 1 for r in reqs[1:])
    for layer in range(eng.cache.num_layers):
        k = eng.cache.key_pools[layer]
        assert all(torch.equal(k[r.block_ids[2]][:7], k[reqs[0].block_ids[2]][:7]) for r in reqs[1:])
    eng.check_invariants()
    eng.run_to_completion(ids)
    eng.check_invariants()
    assert eng.pool.num_used == 0


def test_seeded_n_is_reproducible_and_each_equals_its_seed_alone(model):
    eng = hf_turbo.Engine(model, None, num_blocks=64)
    params = SamplingParams(n=4, seed=11, temperature=1.0, max_new_tokens=10)
    first = [o.token_ids for o in eng.generate([PROMPT], params, use_tqdm=False)]
    again = [o.token_ids for o in eng.generate([PROMPT], params, use_tqdm=False)]
    alone = [eng.generate([PROMPT], SamplingParams(seed=11 + i, temperature=1.0, max_new_tokens=10),
                          use_tqdm=False)[0].token_ids for i in range(4)]
    assert len(first) == 4 and first == again == alone
    assert len({tuple(t) for t in first}) > 1  # each sample has its own key
    # beside another request: the batch does not change a seeded sample
    mixed = eng.generate([PROMPT, [9, 8, 7, 6]], [params, SamplingParams(seed=1, temperature=1.0)], use_tqdm=False)
    assert [o.token_ids for o in mixed[:4]] == first
    eng.check_invariants()
    assert eng.pool.num_used == 0
