"""The "hf_turbo" attention, registered with transformers' AttentionInterface and mask interface.

Two paths through one function:

* Inside an hf_turbo engine forward (a ``turbo_ctx`` ForwardContext in the kwargs): the batch is
  one packed varlen sequence [1, T]; the new K/V were already written to the paged cache by
  ``PagedKVCache.update``; attention reads each sequence's context through its block table
  (Triton on CUDA), or on the CPU from each sequence's contiguous copy (``cache/contiguous.py``).
  No mask tensor exists: the mask function returns None and the kernel applies causality, sliding
  window and softcap itself.
* A plain forward (``from_pretrained(..., attn_implementation="hf_turbo")`` with a DynamicCache or
  none): exactly the stock "sdpa" mask and attention, or the flash varlen kernel on CUDA when
  there is no mask; softcap models go through a torch softmax with the same mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hf_turbo.kernels import cpu_ext, flash_attention_varlen, paged_attention, use_triton
from hf_turbo.kernels.reference import _causal_mask, sequence_attention_ref

__all__ = ["ATTN_NAME", "register", "turbo_attention", "turbo_mask", "engine_forward"]

ATTN_NAME = "hf_turbo"
CTX_KWARG = "turbo_ctx"

# The forward context of the engine forward running in this thread (or asyncio task), for models whose
# decoder layers do not pass the forward's kwargs on to attention (stablelm, nemotron: the layer calls
# self_attn(...) without **kwargs), so ``turbo_ctx`` never arrives. Set only by :func:`engine_forward`.
_FORWARD_CTX: ContextVar = ContextVar("hf_turbo_forward_ctx", default=None)


@contextmanager
def engine_forward(ctx) -> Iterator[None]:
    """Run the enclosed model forward as an engine forward over ``ctx`` (a ForwardContext)."""
    token = _FORWARD_CTX.set(ctx)
    try:
        yield
    finally:
        _FORWARD_CTX.reset(token)


def _forward_context(query: torch.Tensor):
    """The enclosing engine forward's context if this attention call belongs to it: batch 1 and the
    forward's token count (an attention over other tokens, e.g. a sub-model's, stays a plain call)."""
    ctx = _FORWARD_CTX.get()
    if ctx is None or query.shape[0] != 1 or query.shape[2] != ctx.slot_mapping.shape[0]:
        return None
    return ctx


def turbo_mask(*args, **kwargs):
    """Mask function: None inside an engine forward (PagedKVCache reports kv_length 0), else sdpa's."""
    if kwargs.get("kv_length", None) == 0:
        return None
    return sdpa_mask(*args, **kwargs)


def turbo_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """Attention for transformers' interface. query [B, H, S, D]; returns ([B, S, H, D], None)."""
    ctx = kwargs.pop(CTX_KWARG, None)
    if ctx is None:
        ctx = _forward_context(query)
    sliding_window = kwargs.pop("sliding_window", None)
    softcap = kwargs.pop("softcap", None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if ctx is None:
        return _plain_attention(module, query, key, value, attention_mask, scaling, dropout,
                                sliding_window, softcap, **kwargs)
    layer, tiles = _written_layer(module, key, value, ctx)
    if ctx.seen_windows is not None:
        ctx.seen_windows[layer] = sliding_window
    if tiles == 1:
        return _engine_attention(module, query, key, value, ctx, layer, scaling, sliding_window, softcap, kwargs), None
    # K/V tiled over the heads (jetmoe: key.repeat(1, r, 1, 1)): query head e * H_kv + h reads KV head h; the
    # kernels read head j // r, so regroup the query heads as h * r + e and the output back.
    _, h_q, t, d = query.shape
    query = query.view(1, tiles, h_q // tiles, t, d).transpose(1, 2).reshape(1, h_q, t, d)
    _, written_k, written_v = ctx.last_write
    out = _engine_attention(module, query, written_k, written_v, ctx, layer, scaling, sliding_window, softcap, kwargs)
    return out.view(1, t, h_q // tiles, tiles, d).transpose(2, 3).reshape(1, t, h_q, d), None


def _engine_attention(module, query, key, value, ctx, layer, scaling, sliding_window, softcap, kwargs) -> torch.Tensor:
    """Attention inside an engine forward over cache layer ``layer``'s pools; returns [1, T, H, D]."""
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        if softcap is not None:
            raise ValueError(f"{type(module).__name__} combines attention sinks with softcap, which hf_turbo's "
                             "attention does not implement")
        if use_triton(ctx.backend, query):
            raise ValueError(f"{type(module).__name__} uses attention sinks (s_aux), which hf_turbo's Triton "
                             "paged attention does not implement")
        return _paged_sink_attention(query, *ctx.cache.layer_pools(layer), ctx, scaling, sliding_window, sinks)
    k_pool, v_pool = ctx.cache.layer_pools(layer)
    # query: [1, H, T, D] -> [T, H, D]
    q = query[0].transpose(0, 1).contiguous()
    if ctx.seqs is not None and not use_triton(ctx.backend, q):
        return _contiguous_attention(layer, q, key, value, ctx, k_pool, v_pool, scaling, sliding_window, softcap)
    out = paged_attention(q, k_pool, v_pool, ctx.cu_seqlens_q, ctx.context_lens, ctx.block_tables,
                          scale=scaling, sliding_window=sliding_window, softcap=softcap,
                          max_seqlen_q=ctx.max_seqlen_q, backend=ctx.backend, validate=False,
                          max_context_len=ctx.max_context_len, plan_cache=ctx.plan_cache)
    return out.unsqueeze(0)


def _written_layer(module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor, ctx) -> tuple[int, int]:
    """(cache layer, tiles): the layer whose pools hold this call's keys and values, the one the latest
    ``PagedKVCache.update`` wrote them to (hrm_text writes cycle c of layer i to slot i + c * n, not to
    ``module.layer_idx``), and how many times the call's K/V repeat the written heads (1, or jetmoe's
    ``repeat(1, r, 1, 1)``, checked by value). The kernels read K/V from the pools, not from the
    arguments, so a call over other tensors (K/V changed after the update, as diffllama's split values,
    or another layer's) cannot be computed here: ValueError, which the accelerate() probe reports as
    the reason to refuse the model."""
    written = ctx.last_write
    if written is not None and written[1] is key and written[2] is value:
        return written[0], 1
    if written is not None and key.shape[1] % written[1].shape[1] == 0 and key.shape[2:] == written[1].shape[2:]:
        tiles = key.shape[1] // written[1].shape[1]
        if tiles > 1 and all(torch.equal(got, new.repeat(1, tiles, 1, 1))
                             for got, new in ((key, written[1]), (value, written[2]))):
            return written[0], tiles
    raise ValueError(f"{type(module).__name__} attends over keys/values other than those it has just written "
                     "to the cache (changed after cache.update, or another layer's), which hf_turbo's paged "
                     "attention cannot reproduce")


def _contiguous_attention(layer: int, q, key, value, ctx, k_pool, v_pool, scaling, sliding_window, softcap):
    """CPU path: append this forward's K/V to each sequence's contiguous copy and attend over views."""
    mirror = ctx.cache.contiguous
    cu, lens = ctx.host_cu_seqlens_q, ctx.host_context_lens
    if ctx.mirror_plan is None:  # once per forward: slots, arena growth, where the new tokens go
        ctx.mirror_plan = mirror.plan(ctx.seqs, lens, cu, [seq.block_ids for seq in ctx.seqs])
    new_k, new_v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, H_kv, D]
    k_arena, v_arena = mirror.append(layer, ctx.mirror_plan, new_k, new_v, k_pool, v_pool, ctx.block_tables)
    slots = ctx.mirror_plan.slots
    if softcap is None and sliding_window is None and q.dtype == torch.float32 and cpu_ext.available():
        # every single-query sequence in one call, bitwise the per-sequence SDPA calls (kernels/cpu_ext.py)
        if ctx.decode_batch is None:
            picked = [s for s in range(len(lens)) if cu[s + 1] - cu[s] == 1]
            ctx.decode_batch = (len(picked) == len(lens), torch.tensor([cu[s] for s in picked]),
                                torch.tensor([slots[s] for s in picked]), torch.tensor([lens[s] for s in picked]))
        only_decode, rows, row_slots, row_lens = ctx.decode_batch
        t, h_q, d = q.shape
        h_kv = k_arena.shape[1]
        out = torch.empty_like(q)
        if len(rows):
            cpu_ext.decode_attention(q.view(t, h_kv, h_q // h_kv, d), k_arena, v_arena, rows, row_slots, row_lens,
                                     scaling, out.view(t, h_kv, h_q // h_kv, d))
        if not only_decode:
            sequence_attention_ref(q, cu, lens, k_arena, v_arena, slots=slots, scale=scaling, out=out,
                                   skip_decode=True)
        return out.unsqueeze(0)
    out = sequence_attention_ref(q, cu, lens, k_arena, v_arena, slots=slots, scale=scaling,
                                 sliding_window=sliding_window, softcap=softcap)
    return out.unsqueeze(0)


def _plain_attention(module, query, key, value, attention_mask, scaling, dropout, sliding_window, softcap,
                     **kwargs):
    b, h, s, d = query.shape
    kv_len = key.shape[2]
    if query.is_cuda and attention_mask is None and s == kv_len and dropout == 0.0:
        # no padding, square causal: the Triton varlen kernel, one "sequence" per batch row
        cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=query.device)
        out = flash_attention_varlen(
            query.transpose(1, 2).reshape(b * s, h, d), key.transpose(1, 2).reshape(b * s, -1, d),
            value.transpose(1, 2).reshape(b * s, -1, d), cu, cu, scale=scaling, causal=True,
            sliding_window=sliding_window, softcap=softcap)
        return out.view(b, s, h, d), None
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        if attention_mask is None:  # sdpa_mask skipped it: plain causal, queries at the end of the keys
            attention_mask = _causal_mask(s, kv_len, kv_len - s, None, query.device)[None, None]
        return _eager_sink_attention(query, key, value, attention_mask, scaling, sinks), None
    if softcap is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    return _softcap_attention(query, key, value, attention_mask, scaling, softcap)


def _eager_sink_attention(query, key, value, attention_mask, scaling, sinks):
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


def _paged_sink_attention(query, k_pool, v_pool, ctx, scaling, sliding_window, sinks):
    """Sink attention inside an engine forward (CPU): per sequence, its keys gathered from the pool
    through its block table and the eager op sequence. query [1, H, T, D]; returns [1, T, H, D]."""
    bs = k_pool.shape[1]
    cu, lens, tables = ctx.host_cu_seqlens_q, ctx.host_context_lens, ctx.block_tables.tolist()
    out = torch.empty(1, query.shape[2], query.shape[1], query.shape[3], dtype=query.dtype, device=query.device)
    for s, length in enumerate(lens):
        n = cu[s + 1] - cu[s]
        blocks = tables[s][: -(-length // bs)]
        # pool [blocks, bs, H_kv, D] -> this sequence's [1, H_kv, L, D]
        k = k_pool[blocks].flatten(0, 1)[:length].transpose(0, 1)[None]
        v = v_pool[blocks].flatten(0, 1)[:length].transpose(0, 1)[None]
        mask = _causal_mask(n, length, length - n, sliding_window, query.device)[None, None]
        out[:, cu[s]:cu[s + 1]] = _eager_sink_attention(query[:, :, cu[s]:cu[s + 1]], k, v, mask, scaling, sinks)
    return out


def _softcap_attention(query, key, value, attention_mask, scaling, softcap):
    # query [B, H, S, D], key/value [B, H_kv, L, D]; attention_mask bool/float [B, 1, S, L] or None
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    s, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        pos_q = torch.arange(kv_len - s, kv_len, device=query.device)[:, None]
        attention_mask = torch.arange(kv_len, device=query.device)[None, :] <= pos_q
    if attention_mask.dtype == torch.bool:
        # finfo.min, not -inf: fully padded query rows get uniform weights instead of NaN (as eager)
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


_registered = False


def register() -> None:
    """Register "hf_turbo" with transformers (idempotent; done on ``import hf_turbo``)."""
    global _registered
    if _registered:
        return
    AttentionInterface.register(ATTN_NAME, turbo_attention)
    AttentionMaskInterface.register(ATTN_NAME, turbo_mask)
    _registered = True
