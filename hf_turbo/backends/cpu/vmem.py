"""Linux virtual-memory helpers: one physical page store seen through several contiguous windows.

The CPU attention path wants each sequence's keys as one contiguous run per head, yet sequences that
share a cached prompt prefix should share its memory, so that decode reads the prefix once from
the cache hierarchy instead of once per sequence from DRAM. :class:`PageStore` is a ``memfd`` file
(anonymous shared memory; pages are allocated when first written) and :class:`Window` a reserved
stretch of address space whose pieces can be mapped onto any page-aligned range of the store
(``mmap(MAP_FIXED | MAP_SHARED)``), exposed to torch as one flat tensor. Two windows mapping the
same store range read and write the same physical memory; x86 and ARM caches are physically tagged,
so the shared bytes are cached once.

Only used where :func:`supported` (Linux with ``os.memfd_create`` and a usable libc ``mmap``);
callers fall back to private copies elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys

import torch

__all__ = ["PAGE_SIZE", "PageStore", "Window", "map_count_budget", "supported"]

PAGE_SIZE = mmap.PAGESIZE
_PROT_RW = 0x1 | 0x2  # PROT_READ | PROT_WRITE
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS, _MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = None


def _load_libc():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                             ctypes.c_long]
        lib.munmap.restype = ctypes.c_int
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = lib
    return _libc


def supported() -> bool:
    """Whether page-mapped windows work here (Linux, memfd, libc mmap); False disables them.

    The first call tries one store and one window (a sandbox may forbid memfd or shared mappings).
    """
    return _probe()


@functools.cache
def _probe() -> bool:
    if not sys.platform.startswith("linux") or not hasattr(os, "memfd_create"):
        return False
    try:
        _load_libc()
        store = PageStore(PAGE_SIZE, "hf_turbo_probe")
        window = Window(2 * PAGE_SIZE, torch.uint8)
        window.map(PAGE_SIZE, store, 0, PAGE_SIZE)
        window.tensor[PAGE_SIZE] = 7
        window.unmap(PAGE_SIZE, PAGE_SIZE)
        store.close()
        return True
    except (OSError, AttributeError, ValueError):
        return False


def map_count_budget() -> int:
    """How many mappings hf_turbo may hold: half of the kernel's per-process limit (vm.max_map_count)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        limit = 65530  # Linux's default
    return limit // 2


def _mmap(addr: int | None, size: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    out = _load_libc().mmap(addr, size, _PROT_RW, flags, fd, offset)
    if out is None or out == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {size} bytes failed: {os.strerror(err)}")
    return out


class PageStore:
    """``size`` bytes of anonymous shared memory (a memfd); pages cost memory once written."""

    def __init__(self, size: int, name: str = "hf_turbo_kv") -> None:
        self.fd = -1
        self._close = os.close  # kept: module globals may be gone when __del__ runs at exit
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"size must be a positive multiple of the page size {PAGE_SIZE}, got {size}")
        self.size = size
        self.fd = os.memfd_create(name)
        try:
            os.ftruncate(self.fd, size)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self.fd >= 0:
            self._close(self.fd)  # the pages go when the last window mapping them is unmapped
            self.fd = -1

    def __del__(self) -> None:
        self.close()


class _Reservation:
    """Owns an address range; unmapped when the last tensor over it is gone."""

    def __init__(self, size: int) -> None:
        self.size, self.addr = size, None
        self._munmap = _load_libc().munmap  # kept: module globals may be gone when __del__ runs at exit
        self.addr = _mmap(None, size, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE)

    def __del__(self) -> None:
        if self.addr is not None:
            self._munmap(self.addr, self.size)


class Window:
    """A reserved, page-aligned address range of ``size`` bytes seen as a flat ``dtype`` tensor.

    Unmapped parts read as zeros (private anonymous memory); :meth:`map` points a part at a store
    range, :meth:`unmap` returns a part to private zeros. ``tensor`` stays valid (and keeps the range
    reserved) for as long as any view of it lives.
    """

    def __init__(self, size: int, dtype: torch.dtype) -> None:
        size = max(-(-size // PAGE_SIZE), 1) * PAGE_SIZE
        self._res = _Reservation(size)
        self.size = size
        buf = (ctypes.c_byte * size).from_address(self._res.addr)
        buf._owner = self._res  # the tensor holds the buffer, the buffer holds the reservation
        self.tensor = torch.frombuffer(buf, dtype=dtype)

    def map(self, offset: int, store: PageStore, store_offset: int, size: int) -> None:
        """Bytes ``[offset, offset + size)`` of this window now show the store's ``[store_offset, +size)``."""
        if offset % PAGE_SIZE or store_offset % PAGE_SIZE or size % PAGE_SIZE:
            raise ValueError("window mappings must be page-aligned")
        if offset < 0 or offset + size > self.size or store_offset < 0 or store_offset + size > store.size:
            raise ValueError("mapping outside the window or the store")
        _mmap(self._res.addr + offset, size, _MAP_SHARED | _MAP_FIXED, store.fd, store_offset)

    def unmap(self, offset: int, size: int) -> None:
        """Return bytes ``[offset, offset + size)`` to private zero pages (drops the store mapping)."""
        if offset % PAGE_SIZE or size % PAGE_SIZE or offset < 0 or offset + size > self.size:
            raise ValueError("unmap outside the window or not page-aligned")
        _mmap(self._res.addr + offset, size, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED)
