"""Reused scratch buffers for the sampler's full-vocabulary passes, and host lists to the device without a sync.

A fresh [64, 151936] float32 tensor costs more in page faults (the allocator maps big blocks anew each
time) than the elementwise pass that fills it; each thread keeps its largest buffer per name, dtype and
device and hands out views of it.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["on_device", "scratch"]

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


def on_device(data, dtype: torch.dtype | None, device: torch.device | str) -> torch.Tensor:
    """``torch.tensor(data, dtype=dtype, device=device)`` without waiting for the device: on CUDA through pinned
    memory and a non-blocking copy (``torch.tensor(..., device="cuda")`` copies from pageable memory and
    synchronizes the stream: a host sync per call)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
