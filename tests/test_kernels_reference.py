"""The torch reference (CPU path and oracle): against SDPA and a dense float64 textbook attention,
paged vs contiguous, batch invariance, and argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_turbo.backends import flash_attention_varlen, paged_attention, store_kv

# ---------------------------------------------------------------------------------------------- factories


def cumsum0(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def make_varlen(q_lens, k_lens, *, h_q=4, h_kv=2, d=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), h_q, d, generator=g).to(dtype)
    k = torch.randn(sum(k_lens), h_kv, d, generator=g).to(dtype)
    v = torch.randn(sum(k_lens), h_kv, d, generator=g).to(dtype)
    return q, k, v, cumsum0(q_lens), cumsum0(k_lens)


def to_paged(k, v, k_lens, block_size, seed=0):
    """Scatter contiguous packed K/V [T_k, H_kv, D] into a NaN-filled paged cache, blocks in random order."""
    g = torch.Generator().manual_seed(seed)
    n_blk = [-(-n // block_size) for n in k_lens]
    num_blocks = sum(n_blk) + 2
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    bt = torch.full((len(k_lens), max(n_blk)), -1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, *k.shape[1:]), float("nan"), dtype=k.dtype)
    v_cache = k_cache.clone()
    slot_mapping, used = [], 0
    for s, n in enumerate(n_blk):
        bt[s, :n] = perm[used : used + n]
        used += n
        slot_mapping += (bt[s, :n].long()[:, None] * block_size + torch.arange(block_size)).flatten()[
            : k_lens[s]
        ].tolist()
    store_kv(k, v, k_cache, v_cache, torch.tensor(slot_mapping, dtype=torch.int64))
    return k_cache, v_cache, bt


def textbook(q, k, v, cq, ck, *, scale, causal=True, sliding_window=None, softcap=None):
    """Dense float64 attention, one sequence at a time, bottom-right aligned."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for s in range(len(cq) - 1):
        qs, ks, vs = (t.double() for t in (q[cq[s] : cq[s + 1]], k[ck[s] : ck[s + 1]], v[ck[s] : ck[s + 1]]))
        g = qs.shape[1] // ks.shape[1]
        ks, vs = ks.repeat_interleave(g, 1), vs.repeat_interleave(g, 1)
        sc = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if softcap is not None:
            sc = softcap * torch.tanh(sc / softcap)
        qp = torch.arange(len(qs))[:, None] + len(ks) - len(qs)
        kp = torch.arange(len(ks))[None, :]
        mask = (kp <= qp) if causal else torch.ones_like(kp <= qp)
        if sliding_window is not None:
            mask &= kp > qp - sliding_window
        sc = sc.masked_fill(~mask, float("-inf"))
        out[cq[s] : cq[s + 1]] = torch.einsum("hqk,khd->qhd", sc.softmax(-1), vs)
    return out


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---------------------------------------------------------------------------------------------- vs SDPA


@pytest.mark.parametrize("h_q, h_kv", [(4, 4), (8, 2)])
def test_varlen_matches_sdpa_equal_lengths(h_q, h_kv):
    """The stock HF path: SDPA on [B, H, L, D] with is_causal (GQA via repeated KV heads)."""
    b, length, d = 3, 37, 64
    q, k, v, cq, ck = make_varlen([length] * b, [length] * b, h_q=h_q, h_kv=h_kv, d=d)
    out = flash_attention_varlen(q, k, v, cq, ck, scale=d**-0.5)

    def bhld(t):
        return t.view(b, length, -1, d).transpose(1, 2)

    g = h_q // h_kv
    ref = F.scaled_dot_product_attention(
        bhld(q), bhld(k).repeat_interleave(g, 1), bhld(v).repeat_interleave(g, 1), is_causal=True
    )
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(q.shape), atol=1e-6, rtol=1e-5)


def test_paged_decode_matches_sdpa():
    """q_len == 1 against SDPA over the same (contiguous) keys."""
    k_lens = [1, 30, 64, 100]
    q, k, v, cq, ck = make_varlen([1] * 4, k_lens, h_q=8, h_kv=2, d=64, seed=1)
    kc, vc, bt = to_paged(k, v, k_lens, 16)
    out = paged_attention(q, kc, vc, cq, torch.tensor(k_lens, dtype=torch.int32), bt, scale=0.125)
    for s in range(len(k_lens)):
        ks = k[ck[s] : ck[s + 1]].repeat_interleave(4, 1).transpose(0, 1)
        vs = v[ck[s] : ck[s + 1]].repeat_interleave(4, 1).transpose(0, 1)
        ref = F.scaled_dot_product_attention(q[s][:, None], ks, vs, scale=0.125)[:, 0]
        torch.testing.assert_close(out[s], ref, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- vs textbook

OPTIONS = [
    dict(),
    dict(sliding_window=7),
    dict(softcap=5.0),
    dict(sliding_window=20, softcap=3.0),
    dict(causal=False),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("h_q, h_kv", [(2, 2), (4, 2), (8, 2)])
def test_varlen_matches_textbook(opts, h_q, h_kv):
    q_lens, k_lens = [1, 5, 33, 40], [1, 40, 33, 90]
    q, k, v, cq, ck = make_varlen(q_lens, k_lens, h_q=h_q, h_kv=h_kv)
    out = flash_attention_varlen(q, k, v, cq, ck, scale=0.2, **opts)
    assert rel_err(out, textbook(q, k, v, cq, ck, scale=0.2, **opts)) < 1e-6
    out64 = flash_attention_varlen(q.double(), k.double(), v.double(), cq, ck, scale=0.2, **opts)
    assert rel_err(out64, textbook(q, k, v, cq, ck, scale=0.2, **opts)) < 1e-12  # the float64 oracle


@pytest.mark.parametrize("opts", [o for o in OPTIONS if "causal" not in o], ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_matches_contiguous(opts, block_size):
    q_lens, k_lens = [1, 5, 33, 1, 17], [1, 40, 33, 77, 50]
    q, k, v, cq, ck = make_varlen(q_lens, k_lens, h_q=4, h_kv=2, seed=2)
    kc, vc, bt = to_paged(k, v, k_lens, block_size, seed=3)
    ctx = torch.tensor(k_lens, dtype=torch.int32)
    out = paged_attention(q, kc, vc, cq, ctx, bt, scale=0.2, **opts)
    contiguous = flash_attention_varlen(q, k, v, cq, ck, scale=0.2, **opts)
    torch.testing.assert_close(out, contiguous, atol=1e-6, rtol=1e-5)
    assert rel_err(out, textbook(q, k, v, cq, ck, scale=0.2, **opts)) < 1e-6


def test_strided_q():
    """q as a head slice of a fused [T, 3 * H_q, D] projection (the reference takes any strides)."""
    q, k, v, cq, ck = make_varlen([1, 9, 1], [20, 9, 60], seed=8)
    fused = torch.randn(q.shape[0], 3 * q.shape[1], q.shape[2])
    fused[:, 4:8] = q
    kc, vc, bt = to_paged(k, v, [20, 9, 60], 16)
    ctx = torch.tensor([20, 9, 60], dtype=torch.int32)
    out = paged_attention(fused[:, 4:8], kc, vc, cq, ctx, bt, scale=0.2)
    assert torch.equal(out, paged_attention(q, kc, vc, cq, ctx, bt, scale=0.2))


def test_bf16_close_to_float64():
    q, k, v, cq, ck = make_varlen([9, 1], [20, 60], dtype=torch.bfloat16)
    out = flash_attention_varlen(q, k, v, cq, ck, scale=0.2)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, textbook(q, k, v, cq, ck, scale=0.2)) < 1.6e-2


# ---------------------------------------------------------------------------------------------- invariance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [dict(), dict(sliding_window=24), dict(softcap=5.0)], ids=str)
def test_paged_batch_invariance(dtype, opts):
    """A sequence alone (with its own block table) == the same sequence inside a mixed batch."""
    q_lens, k_lens = [1, 7, 1, 1, 30, 1], [50, 60, 1, 17, 30, 300]
    q, k, v, cq, ck = make_varlen(q_lens, k_lens, h_q=4, h_kv=2, dtype=dtype, seed=4)
    kc, vc, bt = to_paged(k, v, k_lens, 16, seed=5)
    ctx = torch.tensor(k_lens, dtype=torch.int32)
    full = paged_attention(q, kc, vc, cq, ctx, bt, scale=0.2, **opts)
    for s in range(len(q_lens)):
        q0, q1 = cq[s].item(), cq[s + 1].item()
        alone = paged_attention(
            q[q0:q1], kc, vc, cumsum0([q1 - q0]), ctx[s : s + 1], bt[s : s + 1, : -(-k_lens[s] // 16)],
            scale=0.2, **opts,
        )
        assert torch.equal(alone, full[q0:q1]), f"sequence {s}"
    decode = [s for s, n in enumerate(q_lens) if n == 1]  # a decode-only sub-batch
    sub = paged_attention(
        q[cq[decode].long()], kc, vc, cumsum0([1] * len(decode)), ctx[decode], bt[decode], scale=0.2, **opts
    )
    assert torch.equal(sub, full[cq[decode].long()])


def test_varlen_batch_invariance():
    q_lens, k_lens = [3, 1, 20], [30, 8, 20]
    q, k, v, cq, ck = make_varlen(q_lens, k_lens, seed=6)
    full = flash_attention_varlen(q, k, v, cq, ck, scale=0.2, sliding_window=9)
    for s in range(3):
        alone = flash_attention_varlen(
            q[cq[s] : cq[s + 1]], k[ck[s] : ck[s + 1]], v[ck[s] : ck[s + 1]], cumsum0([q_lens[s]]),
            cumsum0([k_lens[s]]), scale=0.2, sliding_window=9,
        )
        assert torch.equal(alone, full[cq[s] : cq[s + 1]])


# ---------------------------------------------------------------------------------------------- store_kv / out


def test_store_kv_skips_minus_one():
    k_cache = torch.zeros(2, 4, 1, 8)
    v_cache = torch.zeros(2, 4, 1, 8)
    key = torch.arange(3 * 8, dtype=torch.float32).view(3, 1, 8) + 1
    store_kv(key, -key, k_cache, v_cache, torch.tensor([6, -1, 1], dtype=torch.int32))
    assert torch.equal(k_cache.view(-1, 1, 8)[6], key[0]) and torch.equal(k_cache.view(-1, 1, 8)[1], key[2])
    assert torch.equal(v_cache.view(-1, 1, 8)[6], -key[0])
    assert (k_cache != 0).any(-1).sum() == 2


def test_out_is_written_and_returned():
    q, k, v, cq, ck = make_varlen([4, 1], [4, 9])
    out = torch.full_like(q, float("nan"))
    res = flash_attention_varlen(q, k, v, cq, ck, scale=0.2, out=out)
    assert res is out and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- errors


def paged_args(**over):
    q, k, v, cq, ck = make_varlen([2, 1], [5, 9], h_q=4, h_kv=2, d=16)
    kc, vc, bt = to_paged(k, v, [5, 9], 4)
    args = dict(q=q, k_cache=kc, v_cache=vc, cu_seqlens_q=cq, context_lens=torch.tensor([5, 9], dtype=torch.int32),
                block_tables=bt)
    args.update(over)
    return args


def call_paged(**over):
    a = paged_args(**over)
    return paged_attention(
        a["q"], a["k_cache"], a["v_cache"], a["cu_seqlens_q"], a["context_lens"], a["block_tables"], scale=0.25
    )


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(q=torch.randn(3, 4, 16, dtype=torch.float64)), "q and k_cache must have the same dtype"),
        (dict(q=torch.randn(3, 3, 16)), "multiple of kv heads"),
        (dict(q=torch.randn(3, 4, 8)), "head dim mismatch"),
        (dict(cu_seqlens_q=torch.tensor([0.0, 2.0, 3.0])), "cu_seqlens_q must be int32 or int64"),
        (dict(block_tables=torch.zeros(2, 3)), "block_tables must be int32 or int64"),
        (dict(cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32)), "cu_seqlens_q must have num_seqs"),
        (dict(block_tables=torch.zeros(2, 2, dtype=torch.int32)), "block_tables too small"),
        (dict(context_lens=torch.tensor([1, 9], dtype=torch.int32)), "context_lens must be >= each"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 3], dtype=torch.int32)), "strictly increasing"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_paged_errors(over, match):
    with pytest.raises(ValueError, match=match):
        call_paged(**over)


def test_paged_error_out_of_range_block_id():
    a = paged_args()
    a["block_tables"] = a["block_tables"].clone()
    a["block_tables"][1, 0] = 1000
    with pytest.raises(ValueError, match="block_tables has block ids outside"):
        paged_attention(*a.values(), scale=0.25)


def test_varlen_errors():
    q, k, v, cq, ck = make_varlen([4, 1], [4, 9])
    with pytest.raises(ValueError, match="q_len <= k_len"):
        flash_attention_varlen(q, k, v, cq, cumsum0([3, 10]), scale=1.0)
    with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_k"):
        flash_attention_varlen(q, k, v, cq, cumsum0([13]), scale=1.0)
    with pytest.raises(ValueError, match="sliding_window=4 requires causal=True"):
        flash_attention_varlen(q, k, v, cq, ck, scale=1.0, causal=False, sliding_window=4)
    with pytest.raises(ValueError, match="backend must be"):
        flash_attention_varlen(q, k, v, cq, ck, scale=1.0, backend="cuda")
    with pytest.raises(ValueError, match="out must match q"):
        flash_attention_varlen(q, k, v, cq, ck, scale=1.0, out=torch.empty(5, 4, 16))


def test_store_kv_errors():
    kc, vc = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    key = torch.randn(3, 1, 8)
    with pytest.raises(ValueError, match="slot_mapping length 2"):
        store_kv(key, key, kc, vc, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="slot_mapping must be int32 or int64"):
        store_kv(key, key, kc, vc, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="key, value, k_cache, v_cache must share a dtype"):
        store_kv(key.half(), key.half(), kc, vc, torch.tensor([0, 1, 2]))


def test_triton_rejects_what_it_cannot_take():
    pytest.importorskip("triton")
    a = paged_args()
    with pytest.raises(ValueError, match="Triton kernels take float16, bfloat16 or float32"):
        paged_attention(*(t.double() if t.is_floating_point() else t for t in a.values()), scale=1.0,
                        backend="triton")
    q = a["q"]
    strided = torch.randn(q.shape[0], q.shape[1], 2 * q.shape[2])[..., ::2]
    with pytest.raises(ValueError, match="q must be contiguous in the last dim"):
        paged_attention(strided, *list(a.values())[1:], scale=1.0, backend="triton")
    q8 = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="head dim 8"):
        flash_attention_varlen(q8, q8[:, :2], q8[:, :2], cumsum0([2, 1]), cumsum0([2, 1]), scale=1.0,
                               backend="triton")


@pytest.mark.parametrize("lq,lk,window", [(5, 37, None), (40, 300, None), (3, 9, 4), (17, 120, 50), (1, 64, 8)])
def test_cached_additive_mask_gives_the_bool_masks_bits(lq, lk, window):
    """The small-window path passes SDPA a cached 0/-inf mask: bitwise what the bool mask gives."""
    from hf_turbo.backends.torch_kernels import _attend, _fold_group, _unfold_group
    from hf_turbo.backends.torch_kernels import causal_mask as _causal_mask

    g = torch.Generator().manual_seed(lq * 1000 + lk)
    q = torch.randn(lq, 4, 16, generator=g)
    k = torch.randn(lk, 2, 16, generator=g)
    v = torch.randn(lk, 2, 16, generator=g)
    for k_pos0 in (0, 3):
        q_pos0 = k_pos0 + lk - lq
        got = _attend(q, k, v, q_pos0, k_pos0, scale=0.3, causal=True, sliding_window=window, softcap=None)
        again = _attend(q, k, v, q_pos0, k_pos0, scale=0.3, causal=True, sliding_window=window, softcap=None)
        mask = _causal_mask(lq, lk, q_pos0 - k_pos0, window, q.device).repeat(2, 1)
        want = F.scaled_dot_product_attention(_fold_group(q, 2)[None], k.transpose(0, 1)[None],
                                              v.transpose(0, 1)[None], attn_mask=mask, scale=0.3)
        want = _unfold_group(want[0], lq)
        assert torch.equal(got, want) and torch.equal(again, want)


def test_store_kv_unvalidated_path_equals_the_reference():
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(6, 2, 8, generator=g), torch.randn(6, 2, 8, generator=g)
    slots = torch.tensor([9, 0, 4, 17, 3, 12])
    caches = [torch.zeros(5, 4, 2, 8) for _ in range(4)]
    store_kv(k, v, caches[0], caches[1], slots)
    store_kv(k, v, caches[2], caches[3], slots, validate=False)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
