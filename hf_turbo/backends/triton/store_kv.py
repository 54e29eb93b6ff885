"""Scatter new keys/values into the paged KV cache (the write half of PagedAttention, Kwon et al.,
SOSP 2023):

    k_cache[s // block_size, s % block_size] = key[t],  v_cache[...] = value[t],  s = slot_mapping[t]

Slot -1 (e.g. a padding token) is skipped. One program per token writes all its KV heads.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from hf_turbo.backends import validate as _validate
from hf_turbo.backends.triton.common import check_launchable


@triton.jit
def _store_kv_kernel(
    Key_ptr, Value_ptr, KCache_ptr, VCache_ptr, Slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
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
    k = tl.load(Key_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(Value_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    kc = KCache_ptr + blk * stride_kcb + off * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
    vc = VCache_ptr + blk * stride_vcb + off * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(kc, k, mask=mask)
    tl.store(vc, v, mask=mask)


def store_kv_triton(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """key/value: [T, H_kv, D]; caches: [num_blocks, block_size, H_kv, D]; slot_mapping: [T]."""
    _validate.check_store_kv(key, value, k_cache, v_cache, slot_mapping)
    if key.dtype not in _validate.TRITON_DTYPES:
        raise ValueError(f"Triton store_kv takes float16, bfloat16 or float32; got key dtype {key.dtype}")
    check_launchable(key, _store_kv_kernel)
    num_tokens, h_kv, d = key.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=h_kv, HEAD_DIM=d, BLOCK_H=triton.next_power_of_2(h_kv), BLOCK_D=triton.next_power_of_2(d),
        PAGE=k_cache.shape[1], num_warps=4 if h_kv * d >= 1024 else 1,
    )


__all__ = ["store_kv_triton"]
