"""The Triton backend (CUDA; the interpreter on the CPU under ``TRITON_INTERPRET=1``): the store kernel writes
a step's K/V into the pools, the paged attention kernels read every sequence's context from its block
table on the device, so there is no host metadata to prepare. A captured decode step passes its split-K
scratch (``decode_workspace``) in ``ctx.meta``, so nothing is allocated for it inside the graph."""

from __future__ import annotations

from torch import Tensor

from hf_turbo.backends.base import Backend
from hf_turbo.backends.triton.paged_attention import DecodeScratch, paged_attention_triton
from hf_turbo.backends.triton.store_kv import store_kv_triton

__all__ = ["TritonBackend"]


class TritonBackend(Backend):
    """Paged K/V and attention through the Triton kernels (``store_kv.py``, ``paged_attention.py``)."""

    name = "triton"

    def decode_workspace(self, num_seqs: int, num_heads: int, head_dim: int, max_context_len: int,
                         device) -> DecodeScratch:
        return DecodeScratch.allocate(num_seqs, num_heads, head_dim, max_context_len, device)

    def write_kv(self, ctx, layer: int, key: Tensor, value: Tensor) -> None:
        k_pool, v_pool = ctx.cache.layer_pools(layer)
        store_kv_triton(key, value, k_pool, v_pool, ctx.slot_mapping, *ctx.cache.layer_scales(layer))

    def attend(self, ctx, layer: int, q: Tensor, *, scale: float, sliding_window: int | None,
               softcap: float | None, sinks: Tensor | None = None) -> Tensor:
        if sinks is not None:
            raise ValueError("attention sinks (s_aux) are not implemented by hf_turbo's Triton paged attention")
        k_pool, v_pool = ctx.cache.layer_pools(layer)
        k_scale, v_scale = ctx.cache.layer_scales(layer)  # an 8-bit cache's; None otherwise
        return paged_attention_triton(q, k_pool, v_pool, ctx.cu_seqlens_q, ctx.context_lens, ctx.block_tables,
                                      scale=scale, sliding_window=sliding_window, softcap=softcap, validate=False,
                                      max_context_len=ctx.max_context_len, k_scale=k_scale, v_scale=v_scale,
                                      scratch=ctx.meta if isinstance(ctx.meta, DecodeScratch) else None)
