"""Where one packed forward's sequences live in the CPU K/V rows (``rows.py``): built once per forward."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["MirrorPlan", "SeqState"]


class SeqState:
    """One sequence's row: its slot, and per layer how much of it holds the pool's values."""

    __slots__ = ("slot", "valid", "adopted")

    def __init__(self, slot: int, num_layers: int) -> None:
        self.slot = slot
        self.valid = [0] * num_layers  # per layer: positions [0, valid) hold the pool's values
        self.adopted: list[list[int]] = [[] for _ in range(num_layers)]  # per layer: blocks mapped at indices 0..


@dataclass
class MirrorPlan:
    """Where one packed forward's sequences live in the arenas; built once, shared by every layer.

    Sequence i's new K/V are positions ``starts[i]:ends[i]`` of its slot ``slots[i]``.
    """

    states: list[SeqState]
    slots: list[int]
    starts: list[int]
    ends: list[int]
    capacity: int
    _pos_slot: Tensor | tuple[list[int], list[int]]  # each new token's position and slot ([2, T] or lists)
    _index: dict[int, Tensor] = field(default_factory=dict)
    adopt: list[tuple[int, list[int]]] = field(default_factory=list)  # (sequence, cached blocks to map)
    _flat: Tensor | None = None

    def flat_index(self) -> Tensor:
        """[T] int64 ``slot * capacity + position`` of each new token (``ext.scatter_kv`` with block=capacity)."""
        if self._flat is None:
            cap = self.capacity
            if isinstance(self._pos_slot, tuple):
                pos, slot = self._pos_slot
                self._flat = torch.tensor([s * cap + p for p, s in zip(pos, slot, strict=True)], dtype=torch.int64)
            else:
                self._flat = self._pos_slot[1] * cap + self._pos_slot[0]
        return self._flat

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
