"""The CPU path's contiguous K/V copies: bitwise the pool's values, cut back and refilled correctly, freed."""

from __future__ import annotations

import gc

import pytest
import torch

import hf_turbo
from hf_turbo import Engine, SamplingParams
from hf_turbo.cache.contiguous import ContiguousKV
from hf_turbo.kernels.reference import _gather_keys, paged_attention_ref, sequence_attention_ref
from hf_turbo.testing import tiny_model

BS, H_KV, D = 4, 2, 8


class _Seq:  # any object works as a key (weakly referenced)
    pass


def _pool_with_sequence(length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nblk = -(-length // BS)
    table = torch.randperm(nblk + 3, generator=g)[:nblk].to(torch.int32)
    k_pool = torch.full((nblk + 3, BS, H_KV, D), float("nan"))
    v_pool = torch.full_like(k_pool, float("nan"))
    k = torch.randn(length, H_KV, D, generator=g)
    v = torch.randn(length, H_KV, D, generator=g)
    slots = (table.long()[:, None] * BS + torch.arange(BS)).flatten()[:length]
    k_pool.view(-1, H_KV, D)[slots] = k
    v_pool.view(-1, H_KV, D)[slots] = v
    return k, v, k_pool, v_pool, table


def test_extend_fills_from_pool_appends_and_grows():
    k, v, kp, vp, table = _pool_with_sequence(150)
    mirror = ContiguousKV(num_layers=2, block_size=BS)
    seq = _Seq()
    # admitted on 37 cached positions: the first forward writes [37, 40)
    kb, vb = mirror.extend(1, seq, 37, k[37:40], v[37:40], kp, vp, table)
    assert kb.shape[0] == 40 and torch.equal(kb, k[:40]) and torch.equal(vb, v[:40])
    # decode steps past the initial capacity (64): the buffer grows and keeps its contents
    for p in range(40, 150):
        kb, vb = mirror.extend(1, seq, p, k[p:p + 1], v[p:p + 1], kp, vp, table)
    assert torch.equal(kb, k) and torch.equal(vb, v)
    assert torch.equal(kb, _gather_keys(kp, table, 0, 150))
    assert seq in mirror and len(mirror) == 1 and mirror.nbytes() > 0


def test_extend_cuts_back_rejected_positions():
    k, v, kp, vp, table = _pool_with_sequence(60)
    mirror = ContiguousKV(num_layers=1, block_size=BS)
    seq = _Seq()
    mirror.extend(0, seq, 0, k[:50], v[:50], kp, vp, table)
    other = torch.randn(10, H_KV, D)
    kb, _ = mirror.extend(0, seq, 50, other, other, kp, vp, table)  # speculative positions 50..59
    assert torch.equal(kb[50:], other)
    kb, vb = mirror.extend(0, seq, 52, k[52:53], v[52:53], kp, vp, table)  # 2 accepted, the rest rejected
    assert kb.shape[0] == 53
    assert torch.equal(kb[:50], k[:50]) and torch.equal(kb[50:52], other[:2]) and torch.equal(kb[52], k[52])
    # a preempted request recomputes from 0: everything is rewritten
    kb, _ = mirror.extend(0, seq, 0, k[:5], v[:5], kp, vp, table)
    assert kb.shape[0] == 5 and torch.equal(kb, k[:5])


def test_mirror_is_weak_and_droppable():
    k, v, kp, vp, table = _pool_with_sequence(8)
    mirror = ContiguousKV(num_layers=1, block_size=BS)
    a, b = _Seq(), _Seq()
    mirror.extend(0, a, 0, k, v, kp, vp, table)
    mirror.extend(0, b, 0, k, v, kp, vp, table)
    mirror.drop(a)
    assert a not in mirror and len(mirror) == 1
    del b
    gc.collect()
    assert len(mirror) == 0


@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 20.0), (6, 30.0)])
def test_sequence_attention_equals_paged_reference_bitwise(window, softcap):
    g = torch.Generator().manual_seed(3)
    q_lens, ctx_lens = [1, 7, 1, 1, 12, 1], [9, 30, 1, 40, 12, 17]
    h_q, bs = 4, 4
    nblk = [-(-n // bs) for n in ctx_lens]
    perm = torch.randperm(sum(nblk), generator=g).to(torch.int32)
    table = torch.zeros(len(ctx_lens), max(nblk), dtype=torch.int32)
    kp = torch.randn(sum(nblk), bs, H_KV, D, generator=g)
    vp = torch.randn(sum(nblk), bs, H_KV, D, generator=g)
    used = 0
    for s, n in enumerate(nblk):
        table[s, :n] = perm[used:used + n]
        used += n
    q = torch.randn(sum(q_lens), h_q, D, generator=g)
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    ref = paged_attention_ref(q, kp, vp, torch.tensor(cu, dtype=torch.int32), torch.tensor(ctx_lens, dtype=torch.int32),
                              table, scale=0.3, sliding_window=window, softcap=softcap)
    keys = [_gather_keys(kp, table[s], 0, n).transpose(0, 1).contiguous() for s, n in enumerate(ctx_lens)]
    values = [_gather_keys(vp, table[s], 0, n).transpose(0, 1).contiguous() for s, n in enumerate(ctx_lens)]
    got = sequence_attention_ref(q, cu, ctx_lens, keys, values, scale=0.3, sliding_window=window, softcap=softcap)
    assert torch.equal(got, ref)
    # the same keys in arenas (rows in a shuffled order, spare capacity past each length)
    slots = [4, 0, 2, 5, 1, 3]
    k_arena = torch.full((len(slots), H_KV, max(ctx_lens) + 5, D), float("nan"))
    v_arena = torch.full_like(k_arena, float("nan"))
    for s, n in enumerate(ctx_lens):
        k_arena[slots[s], :, :n], v_arena[slots[s], :, :n] = keys[s], values[s]
    got = sequence_attention_ref(q, cu, ctx_lens, k_arena, v_arena, slots=slots, scale=0.3, sliding_window=window,
                                 softcap=softcap)
    assert torch.equal(got, ref)


def test_plan_appends_many_sequences_and_reuses_slots():
    mirror = ContiguousKV(num_layers=2, block_size=BS)
    seqs = [_Seq() for _ in range(11)]  # more than the initial 8 slots: the arenas grow
    data = [_pool_with_sequence(n, seed=i) for i, n in enumerate(range(3, 80, 7))]
    cu, lens, ks, vs = [0], [], [], []
    for k, v, *_ in data:
        cu.append(cu[-1] + k.shape[0])
        lens.append(k.shape[0])
        ks.append(k)
        vs.append(v)
    plan = mirror.plan(seqs, lens, cu)  # once per forward, for every layer
    for layer in range(2):
        ka, va = mirror.append(layer, plan, torch.cat(ks), torch.cat(vs), data[0][2], data[0][3], data[0][4][None])
        for i, slot in enumerate(plan.slots):
            assert torch.equal(ka[slot, :, :lens[i]], ks[i].transpose(0, 1))
            assert torch.equal(va[slot, :, :lens[i]], vs[i].transpose(0, 1))
    assert len(set(plan.slots)) == len(seqs) and ka.shape[0] >= len(seqs) and ka.shape[2] >= max(lens)
    freed = plan.slots[3]
    mirror.drop(seqs[3])
    newcomer = _Seq()
    assert mirror.plan([newcomer], [1], [0, 1]).slots == [freed]
    del seqs[5]
    gc.collect()
    assert len(mirror) == 11 - 1 - 1 + 1  # seq 3 dropped, seq 5 collected, the newcomer added
    for seq in [*seqs, newcomer]:
        mirror.drop(seq)
    assert len(mirror) == 0 and mirror.nbytes() == 0  # the arenas go with the last sequence


def test_engine_frees_copies_and_matches_block_table_path(monkeypatch):
    import hf_turbo.engine.runner as runner_mod

    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size - 1, (n,), generator=g).tolist() for n in (3, 20, 41, 9)]
    prompts.append(prompts[2][:33] + [5, 6])  # shares 8 full blocks with prompt 2: filled from the pool
    params = SamplingParams(max_new_tokens=10, min_new_tokens=10)
    try:
        engine = Engine(model, config=hf_turbo.TurboConfig(debug_checks=True, max_num_batched_tokens=16))
        cold = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
        warm = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]  # prefix cache hits
        assert engine.stats()["prefix_cache_hit_rate"] > 0
        gc.collect()
        assert len(engine.cache.contiguous) == 0  # every request released its copies

        original = runner_mod.ForwardContext
        monkeypatch.setattr(runner_mod, "ForwardContext", lambda *a, **kw: original(*a, **{**kw, "seqs": None}))
        engine.cache.contiguous.clear()
        paged = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]  # block tables only
        assert len(engine.cache.contiguous) == 0
        assert cold == warm == paged
    finally:
        hf_turbo.restore(model)
