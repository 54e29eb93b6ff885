"""The "hf_turbo" attention, registered with transformers' AttentionInterface and mask interface.

Two paths through one function:

* Inside an hf_turbo engine forward (a ``turbo_ctx`` ForwardContext in the kwargs): the batch is
  one packed varlen sequence [1, T]; the new K/V were already written to the paged cache by
  ``PagedKVCache.update``; the context's backend (``hf_turbo.backends``) reads each sequence's context.
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

from hf_turbo.backends import flash_attention_varlen
from hf_turbo.backends.reference import eager_sink_attention
from hf_turbo.backends.torch_kernels import causal_mask

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
    if sinks is not None and softcap is not None:
        raise ValueError(f"{type(module).__name__} combines attention sinks with softcap, which hf_turbo's attention "
                         "does not implement")
    q = query[0].transpose(0, 1).contiguous()  # [1, H, T, D] -> [T, H, D]
    # a releasing sliding layer's own tables; a layer of a model split over devices: the metadata on its device
    ctx = ctx.for_layer(layer).on(q.device)
    out = ctx.backend.attend(ctx, layer, q, scale=scaling, sliding_window=sliding_window, softcap=softcap,
                             sinks=sinks)
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
            attention_mask = causal_mask(s, kv_len, kv_len - s, None, query.device)[None, None]
        return eager_sink_attention(query, key, value, attention_mask, scaling, sinks), None
    if softcap is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    return _softcap_attention(query, key, value, attention_mask, scaling, softcap)


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
