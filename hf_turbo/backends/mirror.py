"""A device buffer written from the host every step: two pinned host copies used in turn.

A non-blocking copy from pinned memory runs when the stream reaches it, so its host side must not be rewritten
before then. :class:`HostMirror` keeps two host copies: a step writes one while the other may still be read by the
previous step's copy; before a copy is rewritten, the event recorded after the copy that last read it is waited
for (two steps back: normally long done, even when the host runs a step ahead of the device). On the CPU the
"device" buffer is an ordinary tensor and the copy is immediate.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["HostMirror"]


class HostMirror:
    """Host-side writes to ``device`` (a 1-D buffer): :meth:`begin` gives a numpy array to fill, :meth:`push`
    queues its copy. Values not written in a step are undefined (the host copy holds an older step's)."""

    def __init__(self, device: torch.Tensor) -> None:
        self.device = device
        pin = device.is_cuda
        self._hosts = [torch.zeros(device.shape, dtype=device.dtype, pin_memory=pin) for _ in range(2)]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._next = 0

    def begin(self) -> np.ndarray:
        """The host copy to write this step's values into (the copy that last read it has run)."""
        event = self._events[self._next]
        if event is not None and not event.query():
            event.synchronize()
        return self._hosts[self._next].numpy()

    def push(self, n: int | None = None) -> None:
        """Queue the copy of the first ``n`` values (all by default) written since :meth:`begin`."""
        i, self._next = self._next, self._next ^ 1
        self.device[:n].copy_(self._hosts[i][:n], non_blocking=True)
        if self.device.is_cuda:
            event = self._events[i] = self._events[i] or torch.cuda.Event()
            event.record()
