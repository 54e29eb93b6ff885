"""The seam between the engine and the hardware: what an attention backend does, and the fused ops a lean
forward may take from it.

Per forward the runner builds a ``ForwardContext`` (slots, cu_seqlens, context lengths, block tables; on
the device and as host lists) and calls :meth:`Backend.prepare` once, before the model runs: every piece
of metadata the layers need is computed there and kept in ``ctx.meta``. Per layer,
``PagedKVCache.update`` calls :meth:`Backend.write_kv` and the "hf_turbo" attention calls
:meth:`Backend.attend`. Per sequence, :meth:`Backend.release` drops what the backend keeps for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = ["Backend", "FusedOps", "STOCK_OPS", "is_plain_linear"]


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` itself over plain tensors, so ``F.linear`` on its weight is what calling it computes
    (not a quantizer's subclass, nor a quantized weight tensor): the only linear a backend may compute its own way."""
    return type(module) is nn.Linear and type(module.weight) in (nn.Parameter, Tensor)


def _module_forward(module: nn.Module, x: Tensor) -> Tensor:
    return module.forward(x)


def _act_mul(act: nn.Module, gate: Tensor, up: Tensor) -> Tensor:
    return act(gate) * up


def _same_module(module: nn.Module) -> nn.Module:
    return module


@dataclass(frozen=True)
class FusedOps:
    """Ops of a Llama-structured layer that a backend may compute its own way, bit for bit as the stock ones.

    ``norm(module, x)``: an RMSNorm module's forward. ``rope(q, k, cos, sin)``: the rotary embedding, or None
    for the modeling module's ``apply_rotary_pos_emb``. ``act_mul(act, gate, up)``: the MLP's
    ``act(gate) * up``. ``linear(module)``: what computes ``module(x)`` for an ``nn.Linear``.
    """

    norm: Callable[[nn.Module, Tensor], Tensor] = _module_forward
    rope: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
    act_mul: Callable[[nn.Module, Tensor, Tensor], Tensor] = _act_mul
    linear: Callable[[nn.Module], Callable[[Tensor], Tensor]] = _same_module


STOCK_OPS = FusedOps()


class Backend:
    """An attention backend: K/V writes into the paged pools and attention over them, plus fused ops.

    Shapes: T new tokens, S sequences; ``key``/``value`` [T, H_kv, D], ``q`` [T, H_q, D]; pools
    [num_blocks, block_size, H_kv, D] (``ctx.cache.layer_pools(layer)``; an 8-bit cache, ``ctx.cache.quantized``,
    holds int8/fp8 values there and float32 scales [num_blocks, block_size, H_kv] in
    ``ctx.cache.layer_scales(layer)``: quantize in ``write_kv``, dequantize in ``attend``, see ``kv_quant.py``).
    A forward whose context carries no
    sequences (``ctx.seqs is None``: a check on a scratch cache) must work from the block tables alone.
    """

    name = "base"

    def new_cache_state(self, cache) -> Any:
        """What this backend keeps per ``PagedKVCache`` besides its pools (``cache.backend_state``)."""
        return None

    def prepare(self, ctx) -> None:
        """Compute this forward's metadata once, before the model runs (into ``ctx.meta``)."""

    def write_kv(self, ctx, layer: int, key: Tensor, value: Tensor) -> None:
        """Store the forward's new K/V of ``layer`` at ``ctx.slot_mapping`` (int64, all valid)."""
        raise NotImplementedError

    def attend(self, ctx, layer: int, q: Tensor, *, scale: float, sliding_window: int | None,
               softcap: float | None, sinks: Tensor | None = None) -> Tensor:
        """Causal attention of every sequence's new queries over its context in ``layer``'s pools -> [T, H_q, D]."""
        raise NotImplementedError

    def release(self, cache, seq: object) -> None:
        """``seq`` gave its blocks back: drop what the backend keeps for it."""

    def invalidate(self, cache) -> None:
        """The pools of ``cache`` were written outside an engine forward (an imported cache)."""

    def decode_workspace(self, num_seqs: int, num_heads: int, head_dim: int, max_context_len: int, device) -> Any:
        """Buffers a decode-only forward of up to ``num_seqs`` sequences may use instead of allocating its own
        (a captured CUDA graph's split-K scratch), made once and put in ``ctx.meta``; None: none needed."""
        return None

    def fused_ops(self, model: nn.Module, hidden: Tensor) -> FusedOps:
        """The ops a lean forward of ``model`` uses for activations like ``hidden`` (decided once per forward)."""
        return STOCK_OPS
