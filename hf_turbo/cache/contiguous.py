"""A contiguous copy of each running sequence's K/V: the CPU attention path reads it without gathering blocks.

On the CPU the paged attention reference would otherwise gather every sequence's blocks into a
contiguous tensor in every layer of every step: that copy moved three times the bytes the attention
itself reads, and decode on a CPU is bound by memory traffic. Here each sequence keeps, per layer, a
growing ``[capacity, H_kv, D]`` buffer that mirrors its positions ``[0, length)`` in the pool; a
forward appends only its new tokens, and attention reads ``buffer[first_key:end]`` as a view.

The pool stays the source of truth (prefix caching, copy-on-write, the Triton kernels and the
invariants use only the pool): a mirror that is behind the pool (a request admitted on cached
prefix blocks) is filled from the pool once, and one that is ahead (speculative tokens rejected, a
preempted request recomputing) is cut back to where the forward starts writing. Mirrors are keyed
weakly by the sequence object, so they go with it; the engine also drops them when a request
releases its blocks. The values are bitwise the pool's (same K/V, copied), so outputs do not change.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from hf_turbo.kernels.reference import _gather_keys as _gather

__all__ = ["ContiguousKV"]

_MIN_CAPACITY = 64


class ContiguousKV:
    """Per-sequence, per-layer contiguous K/V buffers, alongside a :class:`PagedKVCache`'s pools."""

    def __init__(self, num_layers: int, block_size: int) -> None:
        self.num_layers = num_layers
        self.block_size = block_size
        # seq -> per layer [k_buf, v_buf, valid length]
        self._seqs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, seq: object) -> bool:
        return seq in self._seqs

    def drop(self, seq: object) -> None:
        """Forget a sequence's buffers (it finished, was aborted or preempted)."""
        self._seqs.pop(seq, None)

    def clear(self) -> None:
        self._seqs.clear()

    def nbytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for layers in self._seqs.values() for entry in layers
                   if entry is not None for buf in entry[:2])

    def extend(self, layer: int, seq: object, start: int, new_k: Tensor, new_v: Tensor, k_pool: Tensor,
               v_pool: Tensor, block_row: Tensor) -> tuple[Tensor, Tensor]:
        """Make the buffers hold positions ``[0, start + n)`` (n = new_k.shape[0]) and return them as views.

        new_k/new_v: [n, H_kv, D], the K/V of positions ``[start, start + n)`` (already in the pool).
        block_row: the sequence's block table row, read only when the buffer is behind ``start``.
        """
        n = new_k.shape[0]
        keys, values = self.extend_many(layer, [seq], [start + n], new_k, new_v, [0, n], k_pool, v_pool,
                                        block_row[None])
        return keys[0], values[0]

    def extend_many(self, layer: int, seqs: list, context_lens: list[int], new_k: Tensor, new_v: Tensor,
                    cu: list[int], k_pool: Tensor, v_pool: Tensor, block_tables: Tensor
                    ) -> tuple[list[Tensor], list[Tensor]]:
        """:meth:`extend` for a packed forward: sequence i's new K/V are rows ``cu[i]:cu[i + 1]`` of
        new_k/new_v, the last positions of its ``context_lens[i]``; all appends are one batched copy."""
        dst: list[Tensor] = []
        src: list[Tensor] = []
        keys: list[Tensor] = []
        values: list[Tensor] = []
        for i, seq in enumerate(seqs):
            q0, q1, end = cu[i], cu[i + 1], context_lens[i]
            start = end - (q1 - q0)
            layers = self._seqs.get(seq)
            if layers is None:
                layers = self._seqs[seq] = [None] * self.num_layers
            entry = layers[layer]
            if entry is None or entry[0].shape[0] < end:
                entry = layers[layer] = self._grow(entry, end, new_k)
            k_buf, v_buf, valid = entry
            if valid < start:  # behind the pool: copy the missing positions from their blocks once
                k_buf[valid:start] = _gather(k_pool, block_tables[i], valid, start)
                v_buf[valid:start] = _gather(v_pool, block_tables[i], valid, start)
            if end > start:
                dst += (k_buf[start:end], v_buf[start:end])
                src += (new_k[q0:q1], new_v[q0:q1])
            entry[2] = end  # anything past end (rejected or recomputed positions) is no longer valid
            keys.append(k_buf[:end])
            values.append(v_buf[:end])
        if dst:
            torch._foreach_copy_(dst, src)
        return keys, values

    def _grow(self, entry: list | None, end: int, like: Tensor) -> list:
        old = 0 if entry is None else entry[0].shape[0]
        cap = max(end, 2 * old, _MIN_CAPACITY)
        cap = -(-cap // self.block_size) * self.block_size
        shape = (cap, like.shape[1], like.shape[2])
        k_buf = torch.empty(shape, dtype=like.dtype, device=like.device)
        v_buf = torch.empty(shape, dtype=like.dtype, device=like.device)
        valid = 0
        if entry is not None:
            valid = entry[2]
            k_buf[:valid] = entry[0][:valid]
            v_buf[:valid] = entry[1][:valid]
        return [k_buf, v_buf, valid]

