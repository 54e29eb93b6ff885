"""Host staging for one step's metadata: persistent buffers, one packed copy per dtype, no blocking copy.

``torch.tensor(list, device="cuda")`` copies from pageable memory and waits for the stream to drain: one
host sync per call, seven per step in the runner's old packing. :class:`StepStaging` writes a step's
integer lists into persistent host buffers (pinned on CUDA) through their numpy views, then copies each
dtype's packed block to a persistent device buffer with one ``non_blocking`` copy, and hands out views of
it. The host buffers alternate (two slots), each with the CUDA event of its last copy, so a slot is
rewritten only after the copy that read it has run, even when the CPU runs a step ahead of the GPU.
On the CPU the "device" buffer is the host buffer itself: no copy at all.

Views handed out by :meth:`StepStaging.stage` stay valid until the same slot is staged again (two calls
later); a forward uses them before that.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["StepStaging"]

_MIN_CAPACITY = 256


class _Slot:
    """One host buffer per dtype, its device twin, and the event of the copy that last read it."""

    def __init__(self) -> None:
        self.host: dict[torch.dtype, torch.Tensor] = {}
        self.device: dict[torch.dtype, torch.Tensor] = {}
        self.event: torch.cuda.Event | None = None


class StepStaging:
    """Persistent host and device buffers for a step's int64 and int32 metadata (grown on demand).

    ``stage({"ids": (list, torch.int64), "table": (list_of_rows, torch.int32), ...})`` returns a dict of
    device tensors with the same names: 1-D for a flat list, ``[rows, width]`` for a list of equal-length
    rows (a block table).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"
        self._slots = [_Slot(), _Slot()]
        self._next = 0
        self.num_grows = 0  # how many times a buffer was (re)allocated: the tests' view of reuse

    def _buffers(self, slot: _Slot, dtype: torch.dtype, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        host = slot.host.get(dtype)
        if host is None or host.numel() < n:
            cap = max(_MIN_CAPACITY, 1 << (max(n, 1) - 1).bit_length())
            host = torch.empty(cap, dtype=dtype, pin_memory=self.pinned)
            slot.host[dtype] = host
            slot.device[dtype] = host if self.device.type == "cpu" else torch.empty(cap, dtype=dtype,
                                                                                      device=self.device)
            self.num_grows += 1
        return host, slot.device[dtype]

    def stage(self, parts: dict[str, tuple[Sequence, torch.dtype]]) -> dict[str, torch.Tensor]:
        """Copy every part to the device (one non-blocking copy per dtype); returns device views by name."""
        slot = self._slots[self._next]
        self._next ^= 1
        if slot.event is not None and not slot.event.query():
            slot.event.synchronize()  # the copy that last read this slot's host buffers must have run
        layout: dict[torch.dtype, list[tuple[str, int, int, tuple[int, ...]]]] = {}
        arrays = {}
        for name, (data, dtype) in parts.items():
            arr = np.asarray(data, dtype=np.int64 if dtype == torch.int64 else np.int32)
            if arr.ndim == 1 and arr.shape[0] == 0:
                arr = arr.reshape(0)
            arrays[name] = arr
            entries = layout.setdefault(dtype, [])
            start = entries[-1][2] if entries else 0
            entries.append((name, start, start + arr.size, arr.shape))
        out = {}
        for dtype, entries in layout.items():
            total = entries[-1][2]
            host, dev = self._buffers(slot, dtype, total)
            view = host.numpy()
            for name, a, b, _ in entries:
                view[a:b] = arrays[name].reshape(-1)
            if dev is not host:
                dev[:total].copy_(host[:total], non_blocking=True)
            for name, a, b, shape in entries:
                out[name] = dev[a:b].view(shape)
        if self.device.type == "cuda":
            if slot.event is None:
                slot.event = torch.cuda.Event()
            slot.event.record()
        return out
