"""Scatter new keys/values into the paged KV cache (the write half of PagedAttention, Kwon et al.,
SOSP 2023):

    k_cache[s // block_size, s % block_size] = key[t],  v_cache[...] = value[t],  s = slot_mapping[t]

Slot -1 (e.g. a padding token) is skipped. One program per token writes all its KV heads.

Into an 8-bit cache (QUANT: 1 int8, 2 fp8) each (token, head) row is quantized on the way
(``kv_quant.quantize_kv``, same operations): s = amax / QMAX (1 for an all-zero row), q = rne(x / s)
clamped to [-QMAX, QMAX] (int8: round half to even by adding and subtracting 1.5 * 2^23), and s is
stored in the scale pools [num_blocks, block_size, H_kv].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hf_turbo.backends import validate as _validate
from hf_turbo.backends.kv_quant import KV_QUANT, kv_dtype_of
from hf_turbo.backends.triton.common import check_launchable


@triton.jit
def _store_kv_kernel(
    Key_ptr, Value_ptr, KCache_ptr, VCache_ptr, KScale_ptr, VScale_ptr, Slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_sb, stride_ss,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slot_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    blk = slot // PAGE
    off = slot % PAGE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(Key_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(Value_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask, other=0.0)
    kc = KCache_ptr + blk * stride_kcb + off * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
    vc = VCache_ptr + blk * stride_vcb + off * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
    if QUANT:
        # -- per (token, head): scale, then 8-bit values (masked lanes are 0: they do not move amax)
        sc = blk * stride_sb + off * stride_ss + offs_h
        k_s, k_y = _quantize_rows(k, QUANT, QMAX)
        v_s, v_y = _quantize_rows(v, QUANT, QMAX)
        tl.store(KScale_ptr + sc, k_s, mask=offs_h < NUM_HEADS)
        tl.store(VScale_ptr + sc, v_s, mask=offs_h < NUM_HEADS)
        if QUANT == 1:  # integral already: the int8 cast is exact
            tl.store(kc, k_y.to(KCache_ptr.dtype.element_ty), mask=mask)
            tl.store(vc, v_y.to(VCache_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(kc, k_y.to(KCache_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
            tl.store(vc, v_y.to(VCache_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
    else:
        tl.store(kc, k, mask=mask)
        tl.store(vc, v, mask=mask)


@triton.jit
def _quantize_rows(x, QUANT: tl.constexpr, QMAX: tl.constexpr):
    """x [BLOCK_H, BLOCK_D] -> (scale [BLOCK_H], x / scale in [-QMAX, QMAX], int8: rounded), fp32; IEEE divisions
    as in torch."""
    xf = x.to(tl.float32)
    amax = tl.max(tl.abs(xf), 1)
    s = tl.math.div_rn(tl.where(amax > 0, amax, QMAX), tl.full(amax.shape, QMAX, tl.float32))
    y = tl.math.div_rn(xf, s[:, None])
    if QUANT == 1:
        y = (y + 12582912.0) - 12582912.0  # round half to even (|y| <= 2^22)
    return s, tl.minimum(tl.maximum(y, -QMAX), QMAX)


def store_kv_triton(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                    k_scale: Tensor | None = None, v_scale: Tensor | None = None) -> None:
    """key/value: [T, H_kv, D]; caches: [num_blocks, block_size, H_kv, D]; slot_mapping: [T]; an 8-bit
    cache with its scales ``k_scale``/``v_scale`` [num_blocks, block_size, H_kv] float32."""
    _validate.check_store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    if key.dtype not in _validate.TRITON_DTYPES:
        raise ValueError(f"Triton store_kv takes float16, bfloat16 or float32; got key dtype {key.dtype}")
    check_launchable(key, _store_kv_kernel)
    num_tokens, h_kv, d = key.shape
    if num_tokens == 0:
        return
    quant, qmax = 0, 1.0
    if k_scale is not None:
        quant, qmax = (1 if k_cache.dtype == torch.int8 else 2), KV_QUANT[kv_dtype_of(k_cache)][1]
    else:
        k_scale = v_scale = k_cache  # unused
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, k_scale, v_scale, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), k_scale.stride(0), k_scale.stride(1),
        NUM_HEADS=h_kv, HEAD_DIM=d, BLOCK_H=triton.next_power_of_2(h_kv), BLOCK_D=triton.next_power_of_2(d),
        PAGE=k_cache.shape[1], QUANT=quant, QMAX=qmax, num_warps=4 if h_kv * d >= 1024 else 1,
    )


__all__ = ["store_kv_triton"]
