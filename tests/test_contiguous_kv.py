"""The CPU path's contiguous K/V copies: bitwise the pool's values, cut back and refilled correctly, freed."""

from __future__ import annotations

import gc

import pytest
import torch

import hf_turbo
from hf_turbo import Engine, SamplingParams
from hf_turbo.backends.cpu import vmem
from hf_turbo.backends.cpu.rows import ContiguousKV
from hf_turbo.backends.torch_kernels import gather_keys, paged_attention_ref, sequence_attention_ref
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
    assert torch.equal(kb, gather_keys(kp, table, 0, 150))
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


@pytest.mark.parametrize("window,softcap,decode_only", [(None, None, False), (5, None, False), (None, 20.0, False),
                                                        (6, 30.0, False), (None, None, True)])
def test_sequence_attention_equals_paged_reference_bitwise(window, softcap, decode_only):
    g = torch.Generator().manual_seed(3)
    q_lens, ctx_lens = [1, 7, 1, 1, 12, 1], [9, 30, 1, 40, 12, 17]
    if decode_only:  # a pure decode step (its own fast path over arena rows)
        q_lens = [1] * len(ctx_lens)
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
    keys = [gather_keys(kp, table[s], 0, n).transpose(0, 1).contiguous() for s, n in enumerate(ctx_lens)]
    values = [gather_keys(vp, table[s], 0, n).transpose(0, 1).contiguous() for s, n in enumerate(ctx_lens)]
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


@pytest.mark.cpu_backend
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
        assert len(engine.cache.backend_state) == 0  # every request released its copies

        original = runner_mod.ForwardContext
        monkeypatch.setattr(runner_mod, "ForwardContext", lambda *a, **kw: original(*a, **{**kw, "seqs": None}))
        engine.cache.backend_state.clear()
        paged = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]  # block tables only
        assert len(engine.cache.backend_state) == 0
        assert cold == warm == paged
    finally:
        hf_turbo.restore(model)


# -- page-mapped mode: one block of one head is a whole page (16 positions x 64 dims x fp32 = 4 KiB) ----------
PBS, PD = 16, 64
needs_pages = pytest.mark.skipif(not vmem.supported() or PBS * PD * 4 % vmem.PAGE_SIZE != 0,
                                 reason="page-mapped windows need Linux memfd and 4 KiB pages")


def _pool(num_blocks: int):
    shape = (num_blocks, PBS, H_KV, PD)
    return torch.full(shape, float("nan")), torch.full(shape, float("nan"))


def _write(pool: torch.Tensor, blocks: list[int], start: int, values: torch.Tensor) -> None:
    """What store_kv does: positions [start, start + n) of a sequence into its blocks."""
    for i in range(values.shape[0]):
        p = start + i
        pool[blocks[p // PBS], p % PBS] = values[i]


def _forward(mirror, kp, vp, seqs, tables, starts, news, layers=(0,)):
    """One packed forward: write the pool, plan, append in each layer; return the last layer's arenas and the plan."""
    cu, lens = [0], []
    for s, new in zip(starts, news, strict=True):
        cu.append(cu[-1] + new[0].shape[0])
        lens.append(s + new[0].shape[0])
    for table, s, (k, v) in zip(tables, starts, news, strict=True):
        _write(kp, table, s, k)
        _write(vp, table, s, v)
    plan = mirror.plan(seqs, lens, cu, tables)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    for layer in layers:
        ka, va = mirror.append(layer, plan, torch.cat([n[0] for n in news]), torch.cat([n[1] for n in news]), kp, vp,
                               bt)
        if layer != layers[-1]:
            _assert_mirrors_pool(ka, va, plan, lens, tables, kp, vp)
    return ka, va, plan, lens


def _assert_mirrors_pool(ka, va, plan, lens, tables, kp, vp):
    for i, slot in enumerate(plan.slots):
        table = torch.tensor(tables[i], dtype=torch.int32)
        assert torch.equal(ka[slot, :, :lens[i]], gather_keys(kp, table, 0, lens[i]).transpose(0, 1))
        assert torch.equal(va[slot, :, :lens[i]], gather_keys(vp, table, 0, lens[i]).transpose(0, 1))


@needs_pages
def test_requests_on_cached_blocks_share_the_store_pages():
    g = torch.Generator().manual_seed(0)
    kp, vp = _pool(12)
    mirror = ContiguousKV(num_layers=1, block_size=PBS, num_blocks=12)
    a, b, c = _Seq(), _Seq(), _Seq()
    ka_new, va_new = torch.randn(40, H_KV, PD, generator=g), torch.randn(40, H_KV, PD, generator=g)
    ka, va, plan, _ = _forward(mirror, kp, vp, [a], [[3, 4, 5]], [0], [(ka_new, va_new)])
    slot_a = plan.slots[0]
    # b is admitted on a's two full blocks (32 cached positions): it copies them into the store once
    kb_new, vb_new = torch.randn(5, H_KV, PD, generator=g), torch.randn(5, H_KV, PD, generator=g)
    ka, va, plan, _ = _forward(mirror, kp, vp, [b], [[3, 4, 8]], [32], [(kb_new, vb_new)])
    slot_b = plan.slots[0]
    assert mirror.shares_pages
    assert torch.equal(ka[slot_b, :, :32], ka_new[:32].transpose(0, 1))
    assert torch.equal(va[slot_b, :, :32], va_new[:32].transpose(0, 1))
    assert torch.equal(ka[slot_b, :, 32:37], kb_new.transpose(0, 1))
    # c too, with the pool's copies poisoned: only the store can give c its prefix
    kp[3:5] = float("nan")
    vp[3:5] = float("nan")
    ka, va, plan, _ = _forward(mirror, kp, vp, [c], [[3, 4, 9]], [32], [(kb_new[:1], vb_new[:1])])
    slot_c = plan.slots[0]
    assert torch.equal(ka[slot_c, :, :32], ka_new[:32].transpose(0, 1))
    assert torch.equal(va[slot_c, :, :32], va_new[:32].transpose(0, 1))
    assert torch.equal(ka[slot_a, :, :40], ka_new.transpose(0, 1))  # a keeps its own copy
    # b goes back inside its shared blocks (onto private copies 10, 11): its row becomes private, c's is untouched
    _write(kp, [10, 11], 0, ka_new[:32])
    _write(vp, [10, 11], 0, va_new[:32])
    redo = (torch.randn(3, H_KV, PD, generator=g), torch.randn(3, H_KV, PD, generator=g))
    ka, va, plan, lens = _forward(mirror, kp, vp, [b], [[10, 11, 8]], [20], [redo])
    _assert_mirrors_pool(ka, va, plan, lens, [[10, 11, 8]], kp, vp)
    assert torch.equal(ka[slot_c, :, :32], ka_new[:32].transpose(0, 1))
    ka, va, plan, lens = _forward(mirror, kp, vp, [b], [[10, 11, 8]], [23], [(kb_new, vb_new)])  # back to 28
    _assert_mirrors_pool(ka, va, plan, lens, [[10, 11, 8]], kp, vp)
    assert torch.equal(ka[slot_c, :, :32], ka_new[:32].transpose(0, 1))
    ka[slot_c, 0, 0, 0] = 123.0  # one memory for c and any later adopter; a's and b's rows are their own
    d = _Seq()
    ka, va, plan, _ = _forward(mirror, kp, vp, [d], [[3, 4, 7]], [32], [(kb_new[:1], vb_new[:1])])
    assert ka[plan.slots[0], 0, 0, 0].item() == 123.0
    assert ka[slot_a, 0, 0, 0].item() != 123.0 and ka[slot_b, 0, 0, 0].item() != 123.0


@needs_pages
def test_shared_pages_equal_copies_through_growth_reuse_rejections_and_new_owners():
    g = torch.Generator().manual_seed(1)
    nb = 80
    kp, vp = _pool(nb)
    shared = ContiguousKV(num_layers=2, block_size=PBS, num_blocks=nb)
    copied = ContiguousKV(num_layers=2, block_size=PBS)
    free = list(range(nb))
    seqs: dict[int, _Seq] = {}
    tables: dict[int, list[int]] = {}
    lens: dict[int, int] = {}

    def admit(i, cached_from=None, cached_blocks=0):
        seqs[i], lens[i] = _Seq(), cached_blocks * PBS
        tables[i] = list(tables[cached_from][:cached_blocks]) if cached_from is not None else []

    def step(ids, news):
        starts = [lens[i] for i in ids]
        for i, n in zip(ids, news, strict=True):
            while len(tables[i]) * PBS < lens[i] + n:
                tables[i].append(free.pop(int(torch.randint(len(free), (1,), generator=g))))
        kv = [(torch.randn(n, H_KV, PD, generator=g), torch.randn(n, H_KV, PD, generator=g)) for n in news]
        for mirror in (shared, copied):
            ka, va, plan, ends = _forward(mirror, kp, vp, [seqs[i] for i in ids], [tables[i] for i in ids],
                                          starts, kv, layers=(0, 1))
            _assert_mirrors_pool(ka, va, plan, ends, [tables[i] for i in ids], kp, vp)
        for i, n in zip(ids, news, strict=True):
            lens[i] += n

    for i in range(4):
        admit(i)
    step([0, 1, 2, 3], [40, 33, 7, 16])  # prefill
    for i in range(4, 10):  # > 8 slots (the arenas grow); 4-9 start on 1 or 2 of 0's and 1's full blocks
        admit(i, cached_from=i % 2, cached_blocks=1 + i % 2)
    step(list(range(4, 10)), [int(n) for n in torch.randint(1, 20, (6,), generator=g)])
    for _ in range(45):  # decode past the first capacity (64 positions): rows move, shared pages are remapped
        step(list(range(10)), [1] * 10)
    assert shared.shares_pages and not copied.shares_pages
    lens[5] -= 2  # speculative positions rejected: cut back and rewritten
    step([5], [1])
    # everyone on block tables[0][0] leaves; the block goes to a new owner (fresh content from its first
    # position), and a request cached on the new owner's block must see the new content, not the store's old
    old_block = tables[0][0]
    for i in (0, 4, 6, 8):
        for mirror in (shared, copied):
            mirror.drop(seqs[i])
        if i:
            del seqs[i]
    admit(0)
    tables[0] = [old_block]
    step([0, 1], [20, 1])
    admit(11, cached_from=0, cached_blocks=1)
    step([11, 2], [3, 1])
    # a forward the mirror did not see (no seqs): nothing in the store is trusted afterwards
    shared.invalidate()
    copied.invalidate()
    admit(12, cached_from=1, cached_blocks=2)
    step([12, 3], [2, 1])
    for seq in seqs.values():
        shared.drop(seq)
    assert len(shared) == 0 and shared.nbytes() == 0


@needs_pages
def test_shared_pages_fall_back_to_copies_past_the_mapping_budget():
    g = torch.Generator().manual_seed(2)
    kp, vp = _pool(16)
    mirror = ContiguousKV(num_layers=1, block_size=PBS, num_blocks=16)
    a, b = _Seq(), _Seq()
    new = (torch.randn(64, H_KV, PD, generator=g), torch.randn(64, H_KV, PD, generator=g))
    _forward(mirror, kp, vp, [a], [[9, 2, 7, 0]], [0], [new])
    mirror._map_budget = 4  # far below what mapping four scattered blocks takes
    more = (torch.randn(3, H_KV, PD, generator=g), torch.randn(3, H_KV, PD, generator=g))
    ka, va, plan, lens = _forward(mirror, kp, vp, [b], [[9, 2, 7, 0, 11]], [64], [more])
    assert not mirror.shares_pages
    _assert_mirrors_pool(ka, va, plan, lens, [[9, 2, 7, 0, 11]], kp, vp)
    ka, va, plan, lens = _forward(mirror, kp, vp, [a, b], [[9, 2, 7, 0, 5], [9, 2, 7, 0, 11]], [64, 67],
                                  [more, more])
    _assert_mirrors_pool(ka, va, plan, lens, [[9, 2, 7, 0, 5], [9, 2, 7, 0, 11]], kp, vp)


@needs_pages
def test_vmem_windows_share_store_pages_and_unmap_to_zeros():
    page = vmem.PAGE_SIZE
    store = vmem.PageStore(4 * page)
    a, b = vmem.Window(3 * page, torch.float32), vmem.Window(2 * page, torch.float32)
    a.map(page, store, 2 * page, page)  # a's second page and b's first show the store's third
    b.map(0, store, 2 * page, page)
    per_page = page // 4
    a.tensor[per_page:2 * per_page] = torch.arange(per_page, dtype=torch.float32)
    assert torch.equal(b.tensor[:per_page], torch.arange(per_page, dtype=torch.float32))
    assert not a.tensor[:per_page].any() and not b.tensor[per_page:].any()  # unmapped parts are private zeros
    b.unmap(0, page)
    assert not b.tensor[:per_page].any()
    assert torch.equal(a.tensor[per_page:2 * per_page], torch.arange(per_page, dtype=torch.float32))
    with pytest.raises(ValueError, match="page-aligned"):
        a.map(1, store, 0, page)
    with pytest.raises(ValueError, match="outside"):
        a.map(2 * page, store, 3 * page, 2 * page)
    with pytest.raises(ValueError, match="multiple of the page size"):
        vmem.PageStore(page + 1)


@needs_pages
@pytest.mark.parametrize("fail_at", ["map", "window"])
def test_shared_pages_fall_back_to_copies_when_the_os_refuses(monkeypatch, fail_at):
    g = torch.Generator().manual_seed(3)
    kp, vp = _pool(16)
    mirror = ContiguousKV(num_layers=2, block_size=PBS, num_blocks=16)
    a, b = _Seq(), _Seq()
    new = (torch.randn(40, H_KV, PD, generator=g), torch.randn(40, H_KV, PD, generator=g))
    _forward(mirror, kp, vp, [a], [[4, 5, 6]], [0], [new], layers=(0, 1))

    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(vmem.Window, "map" if fail_at == "map" else "__init__", refuse)
    seqs = [a, b] + [_Seq() for _ in range(8)]  # b adopts a's two full blocks; 10 sequences make the arenas grow
    tables = [[4, 5, 6]] + [[4, 5, 7 + i] for i in range(9)]
    starts = [40] + [32] * 9
    more = [(torch.randn(1, H_KV, PD, generator=g), torch.randn(1, H_KV, PD, generator=g)) for _ in seqs]
    ka, va, plan, lens = _forward(mirror, kp, vp, seqs, tables, starts, more, layers=(0, 1))
    assert not mirror.shares_pages
    _assert_mirrors_pool(ka, va, plan, lens, tables, kp, vp)
