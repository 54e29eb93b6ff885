"""The kernels as functions (KV-cache store, paged attention, varlen flash attention), whichever backend runs them.

Layout (per layer):
    k_cache, v_cache   [num_blocks, block_size, H_kv, D], contiguous; slot = block_id * block_size + offset
    block_tables       int32 [num_seqs, max_blocks_per_seq]; entries past a sequence's blocks are never read
    q                  [T, H_q, D], the new tokens of all sequences packed
    cu_seqlens_q       int32 [num_seqs + 1], prefix sums of q_len (every q_len >= 1)
    context_lens       int32 [num_seqs], tokens of each sequence including the new ones (already stored)

An 8-bit cache (``kv_quant.py``): k_cache/v_cache int8 or fp8 with ``k_scale``/``v_scale`` float32
[num_blocks, block_size, H_kv]; ``store_kv`` quantizes per (token, head), ``paged_attention`` dequantizes.

Query j of sequence s sits at p = context_lens[s] - q_len + j and attends keys k <= p (and
k > p - W with ``sliding_window=W``). Scores are ``scale * q.k``, then ``c * tanh(s / c)`` with
``softcap=c``. Query head h reads KV head h // (H_q // H_kv).

``backend``: "auto" runs Triton for CUDA tensors and the torch reference for CPU tensors; "triton" /
"reference" force one (Triton on CPU tensors needs TRITON_INTERPRET=1 set before import). The engine
does not call these: it goes through a :class:`~hf_turbo.backends.base.Backend`; tests and plain
(non-engine) forwards do.

Batch invariance: every path computes each sequence from that sequence alone, with a path and
tile sizes chosen from its own q_len and context, so a sequence's output is bitwise the same
alone or in any batch (per backend). Paged attention routes q_len == 1 sequences to a split-K
decode kernel (partitions of 512 positions, so the split count depends only on that sequence's
context length) and all other sequences to the unified kernel; a mixed batch launches both.

Validation: with ``validate=True`` (default) shape/dtype/stride checks raise ValueError before any
launch, and the metadata values (cu_seqlens, context_lens vs block_tables capacity, block ids) are
checked with one device->host sync. The Triton wrappers always run the shape checks (they are free
next to a launch); ``validate=False`` skips the value checks there and every check on the CPU
reference path: the engine's hot path, whose metadata it builds itself.
"""

from __future__ import annotations

import importlib.util

from torch import Tensor

from hf_turbo.backends import validate as _validate
from hf_turbo.backends.kv_quant import compact_tables, dequantize_blocks, store_kv_quant
from hf_turbo.backends.torch_kernels import flash_attention_varlen_ref, paged_attention_ref, store_kv_ref

HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["store_kv", "paged_attention", "flash_attention_varlen", "use_triton"]


def use_triton(backend: str, t: Tensor) -> bool:
    """Whether ``backend`` ("auto", "triton", "reference") runs the Triton kernels for tensor ``t``."""
    if backend == "auto":
        return t.is_cuda and HAS_TRITON
    if backend == "reference":
        return False
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' but triton is not installed")
        return True
    raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")


def store_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, *,
             backend: str = "auto", validate: bool = True, k_scale: Tensor | None = None,
             v_scale: Tensor | None = None) -> None:
    """Write key/value [T, H_kv, D] into the caches at slot_mapping [T] (int32/int64; -1 = skip), in place.

    ``validate=False``: the caller guarantees the shapes and dtypes, an int64 slot_mapping and no -1 slot
    (on the CPU: two ``index_copy_`` calls and nothing else). With ``k_scale``/``v_scale`` the caches are
    8-bit and the values are quantized on the way.
    """
    if use_triton(backend, key):
        from hf_turbo.backends.triton.store_kv import store_kv_triton

        store_kv_triton(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    if k_scale is not None or (validate and _validate.check_kv_scales(k_cache, v_cache, k_scale, v_scale)):
        if validate:
            _validate.check_store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        store_kv_quant(key, value, k_cache, v_cache, k_scale, v_scale, slot_mapping)
        return
    if not validate:
        h, d = k_cache.shape[2], k_cache.shape[3]
        k_cache.view(-1, h, d).index_copy_(0, slot_mapping, key)
        v_cache.view(-1, h, d).index_copy_(0, slot_mapping, value)
        return
    _validate.check_store_kv(key, value, k_cache, v_cache, slot_mapping)
    store_kv_ref(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
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
    max_seqlen_q: int | None = None,
    out: Tensor | None = None,
    backend: str = "auto",
    validate: bool = True,
    max_context_len: int | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """Causal attention of packed new tokens over the paged KV cache -> [T, H_q, D] in q's dtype.

    Per sequence: q_len == 1 -> split-K flash-decoding (Triton) / SDPA grouped by equal key range (reference);
    otherwise the unified varlen kernel (Triton) / one SDPA call (reference). ``max_seqlen_q`` is
    accepted for API compatibility and unused (no kernel needs it: programs find their sequence by
    binary search over cu_seqlens_q). ``max_context_len``, an optional upper bound on
    max(context_lens), only sizes the Triton decode scratch (default block_tables.shape[1] * block_size).
    An 8-bit cache comes with ``k_scale``/``v_scale``: the reference dequantizes the blocks it reads first.
    """
    del max_seqlen_q
    if use_triton(backend, q):
        from hf_turbo.backends.triton.paged_attention import paged_attention_triton

        return paged_attention_triton(
            q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale=scale,
            sliding_window=sliding_window, softcap=softcap, out=out, validate=validate,
            max_context_len=max_context_len, k_scale=k_scale, v_scale=v_scale,
        )
    if validate:
        _validate.check_paged_attention(
            q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, sliding_window, softcap, out,
            k_scale, v_scale,
        )
        _validate.check_paged_values(
            cu_seqlens_q, context_lens, block_tables, q.shape[0], k_cache.shape[1], k_cache.shape[0]
        )
    if k_scale is not None:
        used, block_tables = compact_tables(block_tables, context_lens, k_cache.shape[1])
        k_cache = dequantize_blocks(k_cache, k_scale, used, q.dtype)
        v_cache = dequantize_blocks(v_cache, v_scale, used, q.dtype)
    return paged_attention_ref(
        q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale=scale,
        sliding_window=sliding_window, softcap=softcap, out=out,
    )


def flash_attention_varlen(
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
    backend: str = "auto",
    validate: bool = True,
) -> Tensor:
    """Attention over contiguous packed sequences (no cache): q [T_q, H_q, D], k/v [T_k, H_kv, D].

    Per sequence q_len <= k_len; query j sits at k_len - q_len + j (bottom-right causal, like
    flash-attn). sliding_window requires causal=True.
    """
    if use_triton(backend, q):
        from hf_turbo.backends.triton.flash_attention import flash_attention_varlen_triton

        return flash_attention_varlen_triton(
            q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale, causal=causal, sliding_window=sliding_window,
            softcap=softcap, out=out, validate=validate,
        )
    _validate.check_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, sliding_window, softcap, out)
    if validate:
        _validate.check_varlen_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    return flash_attention_varlen_ref(
        q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale, causal=causal, sliding_window=sliding_window,
        softcap=softcap, out=out,
    )
