"""Split-K flash-decoding for single-query sequences (Dao et al., "Flash-Decoding for long-context inference",
2023; vLLM PagedAttention v2): a sequence's keys are cut into partitions of PARTITION_SIZE absolute
positions, each program reduces one partition to (max, sum, acc), and the reduce kernel merges them."""

from __future__ import annotations

import triton
import triton.language as tl

from hf_turbo.backends.triton.common import attn_inner

__all__ = ["paged_decode_reduce_kernel", "paged_decode_split_kernel"]


@triton.jit(do_not_specialize=["sliding_window"])
def paged_decode_split_kernel(
    Q_ptr, K_ptr, V_ptr, KS_ptr, VS_ptr, Out_ptr, PartM_ptr, PartL_ptr, PartAcc_ptr, CuQ_ptr, Ctx_ptr, BT_ptr,
    scale, softcap, sliding_window,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_sb, stride_ss, stride_sh,
    stride_ot, stride_oh, stride_bts,
    stride_pm_s, stride_pm_h, stride_pa_s, stride_pa_h, stride_pa_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PARTITION_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    KV_QUANT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    q_start = tl.load(CuQ_ptr + seq)
    q_len = tl.load(CuQ_ptr + seq + 1) - q_start
    if q_len != 1:  # handled by the unified kernel
        return
    ctx = tl.load(Ctx_ptr + seq)
    if USE_WINDOW:
        key_lo = tl.maximum(ctx - sliding_window, 0)
    else:
        key_lo = 0
    first_part = key_lo // PARTITION_SIZE
    num_parts = tl.cdiv(ctx, PARTITION_SIZE)
    if part < first_part:
        return
    if part >= num_parts:
        return

    # -- rows: the GROUP query heads of this KV head (padded to BLOCK_G >= 16 for tl.dot)
    offs_g = tl.arange(0, BLOCK_G)
    head = kv_head * GROUP + offs_g
    row_ok = offs_g < GROUP
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(
        Q_ptr + q_start.to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_mask[None, :],
        other=0.0,
    )
    q_pos = tl.zeros([BLOCK_G], dtype=tl.int32) + (ctx - 1)

    # -- this partition's keys: [max(part * P, key_lo), min(part * P + P, ctx)); P % BLOCK_N == 0
    lo = tl.maximum(part * PARTITION_SIZE, key_lo)
    hi = tl.minimum(part * PARTITION_SIZE + PARTITION_SIZE, ctx)
    acc = tl.zeros([BLOCK_G, HEAD_DIM_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = attn_inner(
        acc, l_i, m_i, q, q_pos,
        K_ptr + kv_head * stride_kh, V_ptr + kv_head * stride_vh, BT_ptr + seq.to(tl.int64) * stride_bts,
        stride_kb, stride_ks, stride_vb, stride_vs,
        KS_ptr + kv_head * stride_sh, VS_ptr + kv_head * stride_sh, stride_sb, stride_ss,
        (lo // BLOCK_N) * BLOCK_N, hi, ctx, scale, softcap, sliding_window, offs_n, offs_d, d_mask,
        PAGE, BLOCK_N, True, True, True, USE_WINDOW, USE_SOFTCAP, DOT_PRECISION, UPCAST_DOT, KV_QUANT,
    )
    if num_parts - first_part == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # padding rows have l_i == 0
        tl.store(
            Out_ptr + q_start.to(tl.int64) * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(Out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_mask[None, :],
        )
    else:
        pm = seq.to(tl.int64) * stride_pm_s + head * stride_pm_h + part
        tl.store(PartM_ptr + pm, m_i, mask=row_ok)
        tl.store(PartL_ptr + pm, l_i, mask=row_ok)
        pa = seq.to(tl.int64) * stride_pa_s + head[:, None] * stride_pa_h + part * stride_pa_p + offs_d[None, :]
        tl.store(PartAcc_ptr + pa, acc, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["sliding_window"])
def paged_decode_reduce_kernel(
    Out_ptr, PartM_ptr, PartL_ptr, PartAcc_ptr, CuQ_ptr, Ctx_ptr,
    sliding_window,
    stride_ot, stride_oh, stride_pm_s, stride_pm_h, stride_pa_s, stride_pa_h, stride_pa_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PARTITION_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr,
):
    """o = sum_p 2^(m_p - M) acc_p / sum_p 2^(m_p - M) l_p, M = max_p m_p, merged in partition order."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(CuQ_ptr + seq)
    q_len = tl.load(CuQ_ptr + seq + 1) - q_start
    if q_len != 1:
        return
    ctx = tl.load(Ctx_ptr + seq)
    if USE_WINDOW:
        key_lo = tl.maximum(ctx - sliding_window, 0)
    else:
        key_lo = 0
    first_part = key_lo // PARTITION_SIZE
    num_parts = tl.cdiv(ctx, PARTITION_SIZE)
    if num_parts - first_part == 1:  # written by the split kernel
        return
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    pm = PartM_ptr + seq.to(tl.int64) * stride_pm_s + head * stride_pm_h
    pl = PartL_ptr + seq.to(tl.int64) * stride_pm_s + head * stride_pm_h
    pa = PartAcc_ptr + seq.to(tl.int64) * stride_pa_s + head * stride_pa_h + offs_d
    m = tl.load(pm + first_part)
    l_sum = tl.load(pl + first_part)
    acc = tl.load(pa + first_part * stride_pa_p)
    for p in range(first_part + 1, num_parts):
        m_p = tl.load(pm + p)
        m_new = tl.maximum(m, m_p)
        a = tl.exp2(m - m_new)
        b = tl.exp2(m_p - m_new)
        l_sum = l_sum * a + tl.load(pl + p) * b
        acc = acc * a + tl.load(pa + p * stride_pa_p) * b
        m = m_new
    tl.store(
        Out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
        (acc / l_sum).to(Out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )
