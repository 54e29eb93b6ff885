"""Varlen flash attention over contiguous packed sequences (no KV cache), in Triton.

    O = softmax(S) V,   S_ij = scale * q_i . k_j  (or c * tanh(scale * q_i . k_j / c) with softcap c)

Per sequence, query i sits at position k_len - q_len + i (bottom-right aligned, like flash-attn) and,
if causal, attends keys j <= that position (and j > position - W with a sliding window W).
One program per (block of BLOCK_Q query tokens of one sequence, KV head); the GROUP query heads
of a KV head are rows of the same tile so K/V tiles are loaded once per group. Online softmax
with fp32 accumulation (Dao, "FlashAttention-2", 2023). The tile loop is shared with the paged
kernel (``paged_attention._attn_inner``). Tile sizes depend only on (D, GROUP, dtype), so each
sequence's output is independent of the rest of the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hf_turbo.backends import validate as _validate
from hf_turbo.backends.triton.common import attn_inner, check_launchable, seq_of_q_block, unified_config


@triton.jit(do_not_specialize=["num_seqs", "sliding_window"])
def _flash_attn_varlen_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, Out_ptr, CuQ_ptr, CuK_ptr,
    num_seqs, scale, softcap, sliding_window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (last, causal) q blocks start first
    kv_head = tl.program_id(1)
    seq = seq_of_q_block(CuQ_ptr, pid, num_seqs, BLOCK_Q)
    q_start = tl.load(CuQ_ptr + seq)
    q_len = tl.load(CuQ_ptr + seq + 1) - q_start
    q_block = pid - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    k_start = tl.load(CuK_ptr + seq)
    k_len = tl.load(CuK_ptr + seq + 1) - k_start

    # -- rows: BLOCK_Q tokens x GROUP heads; row r = (token r // GROUP, head r % GROUP)
    offs_m = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = k_len - q_len + tok
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    row_off = (q_start + tok).to(tl.int64)
    q = tl.load(
        Q_ptr + row_off[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_mask[None, :],
        other=0.0,
    )

    # -- key tiles: [tile_lo, full_lo) masked, [full_lo, full_hi) unmasked, [full_hi, kv_end) masked
    if CAUSAL:
        pos_lo = k_len - q_len + q_block * BLOCK_Q
        pos_hi = tl.minimum(pos_lo + BLOCK_Q - 1, k_len - 1)
        kv_end = pos_hi + 1
        full_hi = ((pos_lo + 1) // BLOCK_N) * BLOCK_N
        if USE_WINDOW:
            tile_lo = (tl.maximum(pos_lo - sliding_window + 1, 0) // BLOCK_N) * BLOCK_N
            full_lo = tl.minimum(
                tl.cdiv(tl.maximum(pos_hi - sliding_window + 1, 0), BLOCK_N) * BLOCK_N, full_hi
            )
        else:
            tile_lo = 0
            full_lo = 0
    else:
        kv_end = k_len
        full_hi = (k_len // BLOCK_N) * BLOCK_N
        tile_lo = 0
        full_lo = 0

    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    K_seq = K_ptr + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    V_seq = V_ptr + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    acc, l_i, m_i = attn_inner(
        acc, l_i, m_i, q, q_pos, K_seq, V_seq, CuK_ptr, stride_kt, 0, stride_vt, 0, K_seq, V_seq, 0, 0,
        tile_lo, full_lo, kv_end, scale, softcap, sliding_window, offs_n, offs_d, d_mask,
        1, BLOCK_N, False, True, CAUSAL, USE_WINDOW, USE_SOFTCAP, DOT_PRECISION, UPCAST_DOT, False,
    )
    acc, l_i, m_i = attn_inner(
        acc, l_i, m_i, q, q_pos, K_seq, V_seq, CuK_ptr, stride_kt, 0, stride_vt, 0, K_seq, V_seq, 0, 0,
        full_lo, full_hi, kv_end, scale, softcap, sliding_window, offs_n, offs_d, d_mask,
        1, BLOCK_N, False, False, CAUSAL, USE_WINDOW, USE_SOFTCAP, DOT_PRECISION, UPCAST_DOT, False,
    )
    acc, l_i, m_i = attn_inner(
        acc, l_i, m_i, q, q_pos, K_seq, V_seq, CuK_ptr, stride_kt, 0, stride_vt, 0, K_seq, V_seq, 0, 0,
        full_hi, kv_end, kv_end, scale, softcap, sliding_window, offs_n, offs_d, d_mask,
        1, BLOCK_N, False, True, CAUSAL, USE_WINDOW, USE_SOFTCAP, DOT_PRECISION, UPCAST_DOT, False,
    )
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # padding rows have l_i == 0
    tl.store(
        Out_ptr + row_off[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(Out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_mask[None, :],
    )


def flash_attention_varlen_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    out: Tensor | None = None,
    validate: bool = True,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> Tensor:
    """q: [T_q, H_q, D], k/v: [T_k, H_kv, D] -> [T_q, H_q, D]. Block sizes, warps, stages: tests/tuning."""
    _validate.check_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, sliding_window, softcap, out)
    _validate.check_triton_inputs(q, k=k, v=v, out=out)
    check_launchable(q, _flash_attn_varlen_fwd_kernel)
    num_q, h_q, d = q.shape
    h_kv = k.shape[1]
    if validate:
        _validate.check_varlen_values(cu_seqlens_q, cu_seqlens_k, num_q, k.shape[0])
    out = torch.empty_like(q) if out is None else out
    num_seqs = cu_seqlens_q.shape[0] - 1
    if num_q == 0 or num_seqs == 0:
        return out
    group = h_q // h_kv
    d_pad = max(16, triton.next_power_of_2(d))
    cfg_m, cfg_n, warps, stages = unified_config(d_pad, group, q.dtype, q.device)
    bm = max(block_m or cfg_m, triton.next_power_of_2(group))
    block_q = bm // group
    _flash_attn_varlen_fwd_kernel[(num_q // block_q + num_seqs, h_kv)](
        q, k, v, out, cu_seqlens_q, cu_seqlens_k,
        num_seqs, scale, float(softcap or 0.0), sliding_window or 0,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=d, HEAD_DIM_PAD=d_pad, GROUP=group, BLOCK_Q=block_q, BLOCK_M=bm, BLOCK_N=block_n or cfg_n,
        CAUSAL=causal, USE_WINDOW=sliding_window is not None, USE_SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST_DOT=q.dtype == torch.bfloat16 and not q.is_cuda, num_warps=num_warps or warps,
        num_stages=num_stages or stages,
    )
    return out
