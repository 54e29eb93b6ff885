"""Paged attention in Triton: a unified varlen kernel and a split-K flash-decoding kernel.

    O = softmax(S) V,   S_ij = scale * q_i . k_j  (or c * tanh(scale * q_i . k_j / c) with softcap c)

with keys j <= p_i (causal) and j > p_i - W (sliding window W), p_i = context_len - q_len + i.

* ``_paged_attn_fwd_kernel`` (prefill, chunked prefill, mixed batches): one program per (block of
  BLOCK_Q query tokens of one sequence, KV head). The BLOCK_Q tokens x GROUP query heads sharing a
  KV head are the BLOCK_M rows of one tile, so each K/V tile is loaded once per KV head group.
  Online softmax with fp32 accumulation (Dao, "FlashAttention-2", 2023); tiles fully outside the
  causal / sliding window are skipped, tiles fully inside it are not masked.
* ``paged_decode_split_kernel`` + ``paged_decode_reduce_kernel`` (``paged_decode.py``) (q_len == 1): flash-decoding
  (Dao et al., "Flash-Decoding for long-context inference", 2023; vLLM PagedAttention v2, Kwon et
  al., SOSP 2023). A sequence's keys are cut into partitions of PARTITION_SIZE absolute positions;
  each program reduces one partition to (max, sum, acc) and the reduce kernel merges them. The
  number of partitions is cdiv(context_len, PARTITION_SIZE) (minus those before the window): it
  depends only on that sequence. A sequence with a single partition is written directly.

Per-sequence routing (batch invariance): a sequence with q_len == 1 always goes through the
split-K decode kernels, any other sequence through the unified kernel. Both kernels are launched
over the whole batch and each program exits early for sequences that are not its kind, so there is
no host sync; tile sizes depend only on (head dim, GROUP, dtype). A sequence therefore gets
bitwise the same output alone or inside any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from hf_turbo.backends import validate as _validate
from hf_turbo.backends.triton.common import attn_inner, check_launchable, seq_of_q_block, unified_config
from hf_turbo.backends.triton.paged_decode import paged_decode_reduce_kernel, paged_decode_split_kernel

DEFAULT_PARTITION_SIZE = 512


@dataclass(frozen=True)
class DecodeScratch:
    """Preallocated split-K scratch for up to ``m.shape[0]`` decode sequences and ``m.shape[2]`` partitions:
    partial maxima and sums ``m``/``l`` [S, H_q, P] and accumulators ``acc`` [S, H_q, P, D_pad] (fp32)."""

    m: Tensor
    l: Tensor  # noqa: E741 - the online softmax's l
    acc: Tensor

    @classmethod
    def allocate(cls, num_seqs: int, num_heads: int, head_dim: int, max_context_len: int, device,
                 partition_size: int = DEFAULT_PARTITION_SIZE) -> DecodeScratch:
        parts = max(1, triton.cdiv(max_context_len, partition_size))
        d_pad = max(16, triton.next_power_of_2(head_dim))
        m = torch.empty((num_seqs, num_heads, parts), dtype=torch.float32, device=device)
        acc = torch.empty((num_seqs, num_heads, parts, d_pad), dtype=torch.float32, device=device)
        return cls(m, torch.empty_like(m), acc)

    def views(self, num_seqs: int, num_heads: int, parts: int, d_pad: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """The first ``num_seqs`` rows and ``parts`` partitions, or None when this scratch is too small."""
        s, h, p = self.m.shape
        if num_seqs > s or num_heads != h or parts > p or d_pad != self.acc.shape[3]:
            return None
        return self.m[:num_seqs, :, :parts], self.l[:num_seqs, :, :parts], self.acc[:num_seqs, :, :parts]


@triton.jit(do_not_specialize=["num_seqs", "sliding_window"])
def _paged_attn_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, KS_ptr, VS_ptr, Out_ptr, CuQ_ptr, Ctx_ptr, BT_ptr,
    num_seqs, scale, softcap, sliding_window,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_sb, stride_ss, stride_sh,
    stride_ot, stride_oh, stride_bts,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, SKIP_DECODE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, KV_QUANT: tl.constexpr,
):
    pid = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (last, causal) q blocks start first
    kv_head = tl.program_id(1)
    seq = seq_of_q_block(CuQ_ptr, pid, num_seqs, BLOCK_Q)
    q_start = tl.load(CuQ_ptr + seq)
    q_len = tl.load(CuQ_ptr + seq + 1) - q_start
    q_block = pid - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    if SKIP_DECODE:
        if q_len == 1:  # handled by the split-K decode kernel
            return
    ctx = tl.load(Ctx_ptr + seq)

    # -- rows: BLOCK_Q tokens x GROUP heads of this KV head; row r = (token r // GROUP, head r % GROUP)
    offs_m = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = ctx - q_len + tok
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    row_off = (q_start + tok).to(tl.int64)
    q = tl.load(
        Q_ptr + row_off[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_mask[None, :],
        other=0.0,
    )

    # -- key tiles: [tile_lo, full_lo) window edge (masked), [full_lo, full_hi) visible to every row,
    #    [full_hi, kv_end) diagonal (masked)
    pos_lo = ctx - q_len + q_block * BLOCK_Q
    pos_hi = tl.minimum(pos_lo + BLOCK_Q - 1, ctx - 1)
    kv_end = pos_hi + 1
    full_hi = ((pos_lo + 1) // BLOCK_N) * BLOCK_N
    if USE_WINDOW:
        tile_lo = (tl.maximum(pos_lo - sliding_window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(tl.cdiv(tl.maximum(pos_hi - sliding_window + 1, 0), BLOCK_N) * BLOCK_N, full_hi)
    else:
        tile_lo = 0
        full_lo = 0

    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    BT_row = BT_ptr + seq.to(tl.int64) * stride_bts
    K_head = K_ptr + kv_head * stride_kh
    V_head = V_ptr + kv_head * stride_vh
    KS_head = KS_ptr + kv_head * stride_sh
    VS_head = VS_ptr + kv_head * stride_sh
    acc, l_i, m_i = attn_inner(
        acc, l_i, m_i, q, q_pos, K_head, V_head, BT_row, stride_kb, stride_ks, stride_vb, stride_vs,
        KS_head, VS_head, stride_sb, stride_ss,
        tile_lo, full_lo, kv_end, scale, softcap, sliding_window, offs_n, offs_d, d_mask,
        PAGE, BLOCK_N, True, True, True, USE_WINDOW, USE_SOFTCAP, DOT_PRECISION, UPCAST_DOT, KV_QUANT,
    )
    acc, l_i, m_i = attn_inner(
        acc, l_i, m_i, q, q_pos, K_head, V_head, BT_row, stride_kb, stride_ks, stride_vb, stride_vs,
        KS_head, VS_head, stride_sb, stride_ss,
        full_lo, full_hi, kv_end, scale, softcap, sliding_window, offs_n, offs_d, d_mask,
        PAGE, BLOCK_N, True, False, True, USE_WINDOW, USE_SOFTCAP, DOT_PRECISION, UPCAST_DOT, KV_QUANT,
    )
    acc, l_i, m_i = attn_inner(
        acc, l_i, m_i, q, q_pos, K_head, V_head, BT_row, stride_kb, stride_ks, stride_vb, stride_vs,
        KS_head, VS_head, stride_sb, stride_ss,
        full_hi, kv_end, kv_end, scale, softcap, sliding_window, offs_n, offs_d, d_mask,
        PAGE, BLOCK_N, True, True, True, USE_WINDOW, USE_SOFTCAP, DOT_PRECISION, UPCAST_DOT, KV_QUANT,
    )
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # padding rows have l_i == 0
    tl.store(
        Out_ptr + row_off[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(Out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_mask[None, :],
    )


def paged_attention_triton(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cu_seqlens_q: Tensor,
    context_lens: Tensor,
    block_tables: Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    out: Tensor | None = None,
    validate: bool = True,
    max_context_len: int | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    block_m: int | None = None,
    block_n: int | None = None,
    decode_block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    decode_num_warps: int = 4,
    decode_num_stages: int = 2,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    scratch: DecodeScratch | None = None,
) -> Tensor:
    """Validate, then launch the decode split + reduce kernels and (unless every q_len is 1) the
    unified kernel. q: [T, H_q, D], caches: [num_blocks, block_size, H_kv, D] -> [T, H_q, D].

    ``max_context_len`` (an upper bound on max(context_lens)) sizes the split-K scratch; it defaults
    to block_tables.shape[1] * block_size. ``partition_size``, block sizes, warps and stages are for
    tests and tuning; a sequence's result depends on them, so an engine must keep them fixed.
    An 8-bit cache (int8 / fp8) comes with ``k_scale``/``v_scale`` [num_blocks, block_size, H_kv] float32 and
    is dequantized tile by tile after each load. ``scratch``: a preallocated :class:`DecodeScratch` used when
    large enough (a CUDA graph's; results do not depend on it).
    """
    quantized = _validate.check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    _validate.check_paged_attention(
        q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, sliding_window, softcap, out, k_scale, v_scale
    )
    _validate.check_triton_inputs(q, k_cache=k_cache, v_cache=v_cache, out=out)
    check_launchable(q, _paged_attn_fwd_kernel)
    num_tokens, h_q, d = q.shape
    num_blocks, page, h_kv, _ = k_cache.shape
    num_seqs = context_lens.shape[0]
    capacity = block_tables.shape[1] * page
    if validate:
        _validate.check_paged_values(
            cu_seqlens_q, context_lens, block_tables, num_tokens, page, num_blocks, max_context_len
        )
    out = torch.empty_like(q) if out is None else out
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = h_q // h_kv
    d_pad = max(16, triton.next_power_of_2(d))
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    upcast_dot = q.dtype == torch.bfloat16 and not q.is_cuda
    use_window, use_softcap = sliding_window is not None, softcap is not None
    window = sliding_window or 0
    cap = float(softcap or 0.0)
    cfg_m, cfg_n, warps, stages = unified_config(d_pad, group, q.dtype, q.device)
    if not quantized:
        k_scale = v_scale = torch.empty((1, 1, 1), dtype=torch.float32, device=q.device)  # unused
    common = (
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
        out.stride(0), out.stride(1), block_tables.stride(0),
    )

    # -- decode sequences (q_len == 1): split-K over partitions, then reduce
    if not (num_seqs == 1 and num_tokens > 1):
        dec_n = decode_block_n or (64 if d_pad <= 128 else 32)
        if partition_size % dec_n != 0:
            raise ValueError(f"partition_size {partition_size} must be a multiple of decode_block_n {dec_n}")
        bound = capacity if max_context_len is None else min(max_context_len, capacity)
        max_parts = max(1, triton.cdiv(bound, partition_size))
        block_g = max(16, triton.next_power_of_2(group))
        views = None if scratch is None else scratch.views(num_seqs, h_q, max_parts, d_pad)
        if views is not None:
            part_m, part_l, part_acc = views
        else:
            part_m = torch.empty((num_seqs, h_q, max_parts), dtype=torch.float32, device=q.device)
            part_l = torch.empty_like(part_m)
            part_acc = torch.empty((num_seqs, h_q, max_parts, d_pad), dtype=torch.float32, device=q.device)
        paged_decode_split_kernel[(num_seqs, h_kv, max_parts)](
            q, k_cache, v_cache, k_scale, v_scale, out, part_m, part_l, part_acc, cu_seqlens_q, context_lens,
            block_tables,
            scale, cap, window, *common,
            part_m.stride(0), part_m.stride(1), part_acc.stride(0), part_acc.stride(1), part_acc.stride(2),
            HEAD_DIM=d, HEAD_DIM_PAD=d_pad, GROUP=group, BLOCK_G=block_g, BLOCK_N=dec_n, PAGE=page,
            PARTITION_SIZE=partition_size, USE_WINDOW=use_window, USE_SOFTCAP=use_softcap,
            DOT_PRECISION=dot_precision, UPCAST_DOT=upcast_dot, KV_QUANT=quantized, num_warps=decode_num_warps,
            num_stages=decode_num_stages,
        )
        if max_parts > 1:
            paged_decode_reduce_kernel[(num_seqs, h_q)](
                out, part_m, part_l, part_acc, cu_seqlens_q, context_lens, window,
                out.stride(0), out.stride(1), part_m.stride(0), part_m.stride(1),
                part_acc.stride(0), part_acc.stride(1), part_acc.stride(2),
                HEAD_DIM=d, HEAD_DIM_PAD=d_pad, PARTITION_SIZE=partition_size, USE_WINDOW=use_window,
                num_warps=1,
            )

    # -- every other sequence: unified kernel (skips q_len == 1)
    if num_tokens > num_seqs:
        bm = max(block_m or cfg_m, triton.next_power_of_2(group))
        block_q = bm // group
        _paged_attn_fwd_kernel[(num_tokens // block_q + num_seqs, h_kv)](
            q, k_cache, v_cache, k_scale, v_scale, out, cu_seqlens_q, context_lens, block_tables,
            num_seqs, scale, cap, window, *common,
            HEAD_DIM=d, HEAD_DIM_PAD=d_pad, GROUP=group, BLOCK_Q=block_q, BLOCK_M=bm,
            BLOCK_N=block_n or cfg_n, PAGE=page, USE_WINDOW=use_window, USE_SOFTCAP=use_softcap,
            SKIP_DECODE=True, DOT_PRECISION=dot_precision, UPCAST_DOT=upcast_dot, KV_QUANT=quantized,
            num_warps=num_warps or warps,
            num_stages=num_stages or stages,
        )
    return out
