"""Pieces shared by the Triton attention kernels: the tanh, the sequence search, the inner tile loop, tile
configs and the launch check."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

__all__ = ["attn_inner", "check_launchable", "seq_of_q_block", "tanh", "unified_config"]


@triton.jit
def tanh(x):
    # exp-based: libdevice tanh is not available under TRITON_INTERPRET
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def seq_of_q_block(CuQ_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
    """Sequence owning program pid: sequence s owns ids [cu_q[s] // BLOCK_Q + s, ...)."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(CuQ_ptr + mid) // BLOCK_Q + mid
        right = first <= pid
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(right, hi, mid)
    return lo - 1


@triton.jit
def attn_inner(
    acc, l_i, m_i, q, q_pos,
    K_ptr, V_ptr, BT_row_ptr,
    stride_kb, stride_ks, stride_vb, stride_vs,
    KS_ptr, VS_ptr, stride_sb, stride_ss,
    lo, hi, kv_end, scale, softcap, sliding_window,
    offs_n, offs_d, d_mask,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, KV_QUANT: tl.constexpr,
):
    """Online softmax over key tiles [lo, hi). K_ptr/V_ptr (and KS_ptr/VS_ptr) already point at this KV head.

    Paged: key k sits in block BT_row[k // PAGE], slot k % PAGE. Contiguous: K_ptr + k * stride_kb.
    MASKED tiles apply the causal/window mask and k < kv_end; other tiles are fully visible.
    UPCAST_DOT (interpreter + bf16 only): Triton's interpreter multiplies bf16 bit patterns in tl.dot,
    so operands go through fp32 there; bf16 products are exact in fp32, so this only reorders sums.
    KV_QUANT (paged only): K/V are 8-bit (int8 / fp8) with a float32 scale per (slot, head) at
    KS_ptr/VS_ptr + blk * stride_sb + slot * stride_ss; each tile is dequantized right after its load as
    ``(x.to(fp32) * s).to(q.dtype)``, the reference's ``kv_quant.dequantize_kv`` bit for bit.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    for start_n in range(lo, hi, BLOCK_N):
        k_pos = start_n + offs_n  # [BLOCK_N]
        k_in = k_pos < kv_end
        if PAGED:
            if MASKED:
                blk = tl.load(BT_row_ptr + k_pos // PAGE, mask=k_in, other=0).to(tl.int64)
            else:
                blk = tl.load(BT_row_ptr + k_pos // PAGE).to(tl.int64)
            slot = (k_pos % PAGE).to(tl.int64)
            k_off = blk * stride_kb + slot * stride_ks
            v_off = blk * stride_vb + slot * stride_vs
            s_off = blk * stride_sb + slot * stride_ss
        else:
            k_off = k_pos.to(tl.int64) * stride_kb
            v_off = k_pos.to(tl.int64) * stride_vb
        if MASKED:
            kt_mask = k_in[None, :] & d_mask[:, None]
            v_mask = k_in[:, None] & d_mask[None, :]
        else:
            kt_mask = d_mask[:, None]
            v_mask = d_mask[None, :]
        kt = tl.load(K_ptr + k_off[None, :] + offs_d[:, None], mask=kt_mask, other=0.0)  # [D, BLOCK_N]
        if KV_QUANT:
            # -- dequantize: one fp32 multiply by the (slot, head) scale, then the query's dtype
            if MASKED:
                ks = tl.load(KS_ptr + s_off, mask=k_in, other=0.0)
            else:
                ks = tl.load(KS_ptr + s_off)
            kt = (kt.to(tl.float32) * ks[None, :]).to(q.dtype)
        if UPCAST_DOT:
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32))
        else:
            s = tl.dot(q, kt, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        # -- scores in log2 units
        if USE_SOFTCAP:
            s = (softcap * LOG2E) * tanh(s * (scale / softcap))
        else:
            s = s * (scale * LOG2E)
        if MASKED:
            valid = k_in[None, :]
            if CAUSAL:
                valid = valid & (k_pos[None, :] <= q_pos[:, None])
            if USE_WINDOW:
                valid = valid & (k_pos[None, :] > q_pos[:, None] - sliding_window)
            s = tl.where(valid, s, float("-inf"))
        # -- online softmax: update m_i, l_i (rows with no visible key yet keep m_i = -inf)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_ptr + v_off[:, None] + offs_d[None, :], mask=v_mask, other=0.0)  # [BLOCK_N, D]
        if KV_QUANT:
            if MASKED:
                vs = tl.load(VS_ptr + s_off, mask=k_in, other=0.0)
            else:
                vs = tl.load(VS_ptr + s_off)
            v = (v.to(tl.float32) * vs[:, None]).to(q.dtype)
        acc = acc * alpha[:, None]
        if UPCAST_DOT:
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Shared memory a (128 x 128, 3-stage) 16-bit tile needs at D <= 128: Q 32 KiB + 3 x (K + V) 192 KiB.
_BIG_TILE_SMEM = 224 * 1024


@functools.cache
def _max_shared_memory(device_index: int) -> int:
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"])
    except Exception:  # interpreter or an unknown driver: assume the smaller tile
        return 0


def unified_config(head_dim_pad: int, group: int, dtype: torch.dtype, device: torch.device | None = None
                    ) -> tuple[int, int, int, int]:
    """(BLOCK_M rows, BLOCK_N, num_warps, num_stages); a function of (D, GROUP, dtype, the card's shared memory).

    On H200 (benchmarks/gpu_check.sh --sweep, bf16, D=128, N=4096) 128 x 128 x 3 stages gave 385 / 278
    TFLOP/s (varlen / paged) against 340 / 243 for 128 x 64; it needs ~224 KiB of shared memory (Hopper),
    so smaller cards keep 128 x 64.
    """
    if dtype == torch.float32:
        block_m, block_n, warps, stages = 64, 32, 4, 2
    elif head_dim_pad <= 128:
        block_m, block_n, warps, stages = 128, 64, 8, 3
        if device is not None and device.type == "cuda" and \
                _max_shared_memory(device.index if device.index is not None else torch.cuda.current_device()) \
                >= _BIG_TILE_SMEM:
            block_n = 128
    else:
        block_m, block_n, warps, stages = 64, 32, 4, 2
    return max(block_m, triton.next_power_of_2(group)), block_n, warps, stages


def check_launchable(q: Tensor, kernel: object) -> None:
    """CPU tensors can only run under the Triton interpreter."""
    if not q.is_cuda and isinstance(kernel, JITFunction):
        raise ValueError(
            f"the Triton backend needs CUDA tensors (got q on {q.device}) or TRITON_INTERPRET=1 set before "
            "hf_turbo.backends is imported"
        )
