"""The reference backend: torch ops only (``torch_kernels.py``), on any device. The oracle of the tests, the
CPU engine's path wherever the CPU backend is not available or the KV cache is 8-bit, and
``HF_TURBO_BACKEND=reference`` to debug."""

from __future__ import annotations

import torch
from torch import Tensor

from hf_turbo.backends.base import Backend
from hf_turbo.backends.kernels import store_kv
from hf_turbo.backends.kv_quant import compact_tables, dequantize_blocks, write_quantized
from hf_turbo.backends.torch_kernels import causal_mask, gather_keys, paged_attention_ref, plan_paged

__all__ = ["ReferenceBackend", "eager_sink_attention", "paged_sink_attention"]

_READ = "kv_read"  # ctx.meta key of an 8-bit cache's (blocks read, block tables renumbered into them)


class ReferenceBackend(Backend):
    """K/V writes by ``index_copy_``; per-sequence SDPA over each sequence's blocks (single-query sequences
    with equal key ranges in one call); attention sinks by the eager op sequence.

    ``prepare`` plans the full-attention layers' gathers (``ctx.meta``: window -> plan); a sliding-window
    layer's plan is added by the first layer with that window and shared by the rest.

    An 8-bit cache (``kv_quant.py``): ``write_kv`` quantizes per (token, head); ``attend`` dequantizes the
    blocks the forward reads (found once in ``prepare``) into a float pool of just those blocks, then runs
    the same attention over it.
    """

    name = "reference"

    def prepare(self, ctx) -> None:
        ctx.meta = {}
        tables = ctx.block_tables
        if ctx.cache.quantized:
            ctx.meta[_READ] = compact_tables(tables, ctx.context_lens, ctx.cache.block_size)
            tables = ctx.meta[_READ][1]
        if any(b - a == 1 for a, b in zip(ctx.host_cu_seqlens_q, ctx.host_cu_seqlens_q[1:])):
            ctx.meta[(None, True)] = plan_paged(ctx.host_cu_seqlens_q, ctx.host_context_lens, tables,
                                                ctx.cache.block_size, None, None)

    def write_kv(self, ctx, layer: int, key: Tensor, value: Tensor) -> None:
        cache = ctx.cache
        if cache.quantized:
            for pool, scales, src in zip(cache.layer_pools(layer), cache.layer_scales(layer), (key, value)):
                write_quantized(pool, scales, ctx.slot_mapping, src, cache.kv_dtype)
            return
        store_kv(key, value, *cache.layer_pools(layer), ctx.slot_mapping, backend="reference", validate=False)

    def attend(self, ctx, layer: int, q: Tensor, *, scale: float, sliding_window: int | None,
               softcap: float | None, sinks: Tensor | None = None) -> Tensor:
        k_pool, v_pool = ctx.cache.layer_pools(layer)
        plans = ctx.meta if isinstance(ctx.meta, dict) else None
        tables = ctx.block_tables
        if ctx.cache.quantized:
            read = plans.get(_READ) if plans is not None else None
            used, tables = read or compact_tables(tables, ctx.context_lens, ctx.cache.block_size)
            k_scales, v_scales = ctx.cache.layer_scales(layer)
            k_pool = dequantize_blocks(k_pool, k_scales, used, q.dtype)  # [U, bs, H_kv, D]
            v_pool = dequantize_blocks(v_pool, v_scales, used, q.dtype)
        if sinks is not None:
            if softcap is not None:
                raise ValueError("attention sinks with softcap are not implemented")
            return paged_sink_attention(q, k_pool, v_pool, ctx, scale, sliding_window, sinks, tables)
        return paged_attention_ref(q, k_pool, v_pool, ctx.cu_seqlens_q, ctx.context_lens, tables,
                                   scale=scale, sliding_window=sliding_window, softcap=softcap, plans=plans)


def eager_sink_attention(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor, scaling: float,
                         sinks: Tensor) -> Tensor:
    """Attention with a learned per-head sink logit in the softmax (gpt_oss, flint, granite_swa), op for
    op as transformers' eager version. query [B, H, S, D]; key/value [B, H_kv, L, D]; attention_mask
    bool (True = attend) or additive [B or 1, 1, S, L]; sinks [H]. Returns [B, S, H, D]."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # repeat_kv
        b, h_kv, length, d = key.shape
        key = key[:, :, None].expand(b, h_kv, groups, length, d).reshape(b, h_kv * groups, length, d)
        value = value[:, :, None].expand(b, h_kv, groups, length, d).reshape(b, h_kv * groups, length, d)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask.dtype == torch.bool:
        weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
    else:
        weights = weights + attention_mask
    sink = sinks.reshape(1, -1, 1, 1).expand(query.shape[0], -1, query.shape[-2], -1).to(weights.dtype)
    combined = torch.cat([weights, sink], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1].to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def paged_sink_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, ctx, scaling: float,
                         sliding_window: int | None, sinks: Tensor, block_tables: Tensor | None = None) -> Tensor:
    """Sink attention over the paged pools: per sequence, its keys gathered through its block table (``ctx``'s
    unless ``block_tables`` is given) and the eager op sequence. q [T, H, D]; returns [T, H, D]."""
    cu, lens = ctx.host_cu_seqlens_q, ctx.host_context_lens
    tables = ctx.block_tables if block_tables is None else block_tables
    query = q.transpose(0, 1)[None]  # [1, H, T, D]
    out = torch.empty_like(q)
    for s, length in enumerate(lens):
        n = cu[s + 1] - cu[s]
        # this sequence's [1, H_kv, L, D]
        k = gather_keys(k_pool, tables[s], 0, length).transpose(0, 1)[None]
        v = gather_keys(v_pool, tables[s], 0, length).transpose(0, 1)[None]
        mask = causal_mask(n, length, length - n, sliding_window, q.device)[None, None]
        out[cu[s]:cu[s + 1]] = eager_sink_attention(query[:, :, cu[s]:cu[s + 1]], k, v, mask, scaling, sinks)[0]
    return out
