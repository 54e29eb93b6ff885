"""A contiguous copy of each running sequence's K/V: the CPU attention path reads it without gathering blocks.

On the CPU the paged attention reference would otherwise gather every sequence's blocks into a
contiguous tensor in every layer of every step: that copy moved three times the bytes the attention
itself reads, and decode on a CPU is bound by memory traffic. Here every running sequence owns one
row (a *slot*) of a per-layer arena ``[slots, H_kv, capacity, D]`` that mirrors its positions
``[0, length)`` in the pool, head-major, so that each head's keys are one contiguous run (the CPU
SDPA kernel streams them ~20% faster than rows strided by ``H_kv * D``). A forward appends its new
tokens to every sequence with one ``index_copy_`` per layer and tensor, and attention reads
``arena[slot, :, first_key:end]`` as a view.

The pool stays the source of truth (prefix caching, copy-on-write, the Triton kernels and the
invariants use only the pool): a mirror that is behind the pool (a request admitted on cached
prefix blocks) is filled from the pool once, and one that is ahead (speculative tokens rejected, a
preempted request recomputing) is cut back to where the forward starts writing. Sequences are keyed
weakly, so a slot is reclaimed once its sequence is gone; the engine also drops them when a request
releases its blocks, and the arenas are freed when no sequence is left. The values are bitwise the
pool's (same K/V, copied), so outputs do not change.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hf_turbo.kernels.reference import _gather_keys as _gather

__all__ = ["ContiguousKV", "MirrorPlan"]

_MIN_CAPACITY = 64
_MIN_SLOTS = 8
_SMALL_PLAN = 256  # decode steps up to this many sequences build their arena index from Python ints


class _SeqState:
    __slots__ = ("slot", "valid")

    def __init__(self, slot: int, num_layers: int) -> None:
        self.slot = slot
        self.valid = [0] * num_layers  # per layer: positions [0, valid) hold the pool's values


@dataclass
class MirrorPlan:
    """Where one packed forward's sequences live in the arenas; built once, shared by every layer.

    Sequence i's new K/V are positions ``starts[i]:ends[i]`` of its slot ``slots[i]``.
    """

    states: list[_SeqState]
    slots: list[int]
    starts: list[int]
    ends: list[int]
    capacity: int
    _pos_slot: Tensor | tuple[list[int], list[int]]  # each new token's position and slot ([2, T] or lists)
    _index: dict[int, Tensor] = field(default_factory=dict)

    def index(self, num_heads: int, device: torch.device) -> Tensor:
        """[T * H] flat row of each (token, head) in an arena viewed as ``[slots * H * capacity, D]``."""
        idx = self._index.get(num_heads)
        if idx is not None:
            return idx
        cap = self.capacity
        if isinstance(self._pos_slot, tuple):  # few tokens: cheaper as Python ints
            pos, slot = self._pos_slot
            idx = torch.tensor([(s * num_heads + h) * cap + p for p, s in zip(pos, slot, strict=True)
                                for h in range(num_heads)], dtype=torch.int64, device=device)
        else:
            pos, slot = self._pos_slot.to(device)
            heads = torch.arange(num_heads, dtype=torch.int64, device=device)
            idx = ((slot[:, None] * num_heads + heads[None, :]) * cap + pos[:, None]).reshape(-1)
        self._index[num_heads] = idx
        return idx


class ContiguousKV:
    """Per-layer arenas holding a contiguous, head-major copy of each running sequence's K/V."""

    def __init__(self, num_layers: int, block_size: int) -> None:
        self.num_layers = num_layers
        self.block_size = block_size
        self._seqs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # seq -> _SeqState
        self._free: list[int] = []
        self._next_slot = 0  # slot ids handed out so far (ids below it are live or in _free)
        self._num_slots = 0
        self._capacity = 0
        self._k: list[Tensor | None] = [None] * num_layers
        self._v: list[Tensor | None] = [None] * num_layers

    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, seq: object) -> bool:
        return seq in self._seqs

    def drop(self, seq: object) -> None:
        """Forget a sequence's copy (it finished, was aborted or preempted); its slot is reused."""
        state = self._seqs.pop(seq, None)
        if state is not None:
            self._free.append(state.slot)
        if not self._seqs:
            self.clear()

    def clear(self) -> None:
        """Forget every sequence and free the arenas."""
        self._seqs.clear()
        self._free = []
        self._next_slot = self._num_slots = self._capacity = 0
        self._k = [None] * self.num_layers
        self._v = [None] * self.num_layers

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._k + self._v if t is not None)

    # -- per forward ---------------------------------------------------------------------------
    def plan(self, seqs: list, context_lens: list[int], cu: list[int]) -> MirrorPlan:
        """Give every sequence a slot, grow the arenas to fit, and index the forward's new tokens."""
        states, slots, starts = [], [], []
        for i, seq in enumerate(seqs):
            state = self._seqs.get(seq)
            if state is None:
                state = self._seqs[seq] = _SeqState(self._take_slot(), self.num_layers)
            states.append(state)
            slots.append(state.slot)
            starts.append(context_lens[i] - (cu[i + 1] - cu[i]))
        need = max(context_lens, default=0)
        if need > self._capacity or self._next_slot > self._num_slots:
            self._grow(need)
        total = cu[-1] if cu else 0
        if total <= _SMALL_PLAN and total == len(seqs) and all(c1 - c0 == 1 for c0, c1 in zip(cu, cu[1:])):
            pos_slot = (starts, slots)  # decode: each sequence's one new token sits at its start
        else:
            counts = torch.tensor([cu[i + 1] - cu[i] for i in range(len(seqs))], dtype=torch.int64)
            # position of each new token: start of its sequence + offset within the sequence's rows
            offsets = torch.tensor([s - c for s, c in zip(starts, cu[:-1], strict=True)], dtype=torch.int64)
            pos = torch.repeat_interleave(offsets, counts, output_size=total) + torch.arange(total, dtype=torch.int64)
            slot_t = torch.repeat_interleave(torch.tensor(slots, dtype=torch.int64), counts, output_size=total)
            pos_slot = torch.stack([pos, slot_t])
        return MirrorPlan(states, slots, starts, list(context_lens), self._capacity, pos_slot)

    def append(self, layer: int, plan: MirrorPlan, new_k: Tensor, new_v: Tensor, k_pool: Tensor,
               v_pool: Tensor, block_tables: Tensor) -> tuple[Tensor, Tensor]:
        """Write this forward's new K/V ([T, H_kv, D]) for every planned sequence; return the arenas.

        A sequence whose copy is behind its first new position is first filled from its blocks
        (``block_tables`` row i) in the pool.
        """
        h, d = new_k.shape[1], new_k.shape[2]
        ka, va = self._k[layer], self._v[layer]
        if ka is None or ka.shape[1] != h or ka.shape[3] != d:
            ka, va = self._allocate(layer, h, d, new_k)
        if plan.capacity != self._capacity:
            raise RuntimeError("ContiguousKV grew after this forward was planned")
        for i, state in enumerate(plan.states):
            start, valid = plan.starts[i], state.valid[layer]
            if valid < start:  # behind the pool: copy the missing positions from their blocks once
                ka[state.slot, :, valid:start] = _gather(k_pool, block_tables[i], valid, start).transpose(0, 1)
                va[state.slot, :, valid:start] = _gather(v_pool, block_tables[i], valid, start).transpose(0, 1)
            state.valid[layer] = plan.ends[i]  # anything past end (rejected, recomputed) is no longer valid
        if new_k.shape[0]:
            idx = plan.index(h, ka.device)
            ka.view(-1, d).index_copy_(0, idx, new_k.reshape(-1, d))
            va.view(-1, d).index_copy_(0, idx, new_v.reshape(-1, d))
        return ka, va

    def extend(self, layer: int, seq: object, start: int, new_k: Tensor, new_v: Tensor, k_pool: Tensor,
               v_pool: Tensor, block_row: Tensor) -> tuple[Tensor, Tensor]:
        """One sequence: hold positions ``[0, start + n)`` and return them as ``[start + n, H_kv, D]`` views.

        new_k/new_v: [n, H_kv, D], the K/V of positions ``[start, start + n)`` (already in the pool).
        """
        n = new_k.shape[0]
        plan = self.plan([seq], [start + n], [0, n])
        ka, va = self.append(layer, plan, new_k, new_v, k_pool, v_pool, block_row[None])
        slot, end = plan.slots[0], start + n
        return ka[slot, :, :end].transpose(0, 1), va[slot, :, :end].transpose(0, 1)

    # -- storage -------------------------------------------------------------------------------
    def _take_slot(self) -> int:
        if not self._free and self._next_slot > len(self._seqs):  # slots of collected sequences come back
            live = {state.slot for state in self._seqs.values()}
            self._free = [s for s in range(self._next_slot - 1, -1, -1) if s not in live]
        if self._free:
            return self._free.pop()
        self._next_slot += 1
        return self._next_slot - 1

    def _grow(self, length_needed: int) -> None:
        """Reallocate every arena with room for all handed-out slots and ``length_needed`` positions."""
        slots, cap = self._num_slots, self._capacity
        if self._next_slot > slots:
            slots = max(self._next_slot, 2 * slots, _MIN_SLOTS)
        if length_needed > cap:
            cap = max(length_needed, 2 * cap, _MIN_CAPACITY)
            cap = -(-cap // self.block_size) * self.block_size
        old_slots, old_cap = self._num_slots, self._capacity
        self._num_slots, self._capacity = slots, cap
        for arenas in (self._k, self._v):
            for layer, old in enumerate(arenas):
                if old is not None:
                    new = torch.empty((slots, old.shape[1], cap, old.shape[3]), dtype=old.dtype, device=old.device)
                    new[:old_slots, :, :old_cap] = old
                    arenas[layer] = new

    def _allocate(self, layer: int, h: int, d: int, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (self._num_slots, h, self._capacity, d)
        self._k[layer] = torch.empty(shape, dtype=like.dtype, device=like.device)
        self._v[layer] = torch.empty(shape, dtype=like.dtype, device=like.device)
        for state in self._seqs.values():  # a fresh arena holds nothing yet
            state.valid[layer] = 0
        return self._k[layer], self._v[layer]
