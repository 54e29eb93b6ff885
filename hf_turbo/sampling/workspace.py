"""Reused scratch buffers for the sampler's full-vocabulary passes.

A fresh [64, 151936] float32 tensor costs more in page faults (the allocator maps big blocks anew each
time) than the elementwise pass that fills it; each thread keeps its largest buffer per name, dtype and
device and hands out views of it.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["scratch"]

_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape``, backed by this thread's buffer ``name``."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    numel = 1
    for s in shape:
        numel *= s
    key = (name, dtype, torch.device(device))
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)
