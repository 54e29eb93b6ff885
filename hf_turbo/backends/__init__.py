"""Attention backends: one interface (``base.py``), three implementations, one selector.

=============  ===================================================================================
``triton``     The CUDA kernels (``triton/``): paged store, unified varlen + split-K decode attention.
``reference``  Torch ops only (``reference.py`` over ``torch_kernels.py``): the tests' oracle, any device.
``cpu``        The reference's bits, fast on a CPU (``cpu/``): contiguous K/V rows, C++ ops, packed GEMM.
=============  ===================================================================================

``TurboConfig.backend`` picks one: ``"auto"`` (default) is ``triton`` on CUDA and ``cpu`` on the CPU
(``reference`` where ``hf_turbo.backends.cpu`` cannot be imported). The environment variable
``HF_TURBO_BACKEND`` overrides that field for a whole process (e.g. ``HF_TURBO_BACKEND=reference`` to
debug a kernel). A CUDA engine never imports ``backends/cpu``.

An 8-bit KV cache (``CacheConfig.kv_dtype``, ``kv_quant.py``) runs on ``triton`` and ``reference``; the
``cpu`` backend keeps float copies of every running sequence's K/V, which would undo the saving, so where
it would be picked :func:`resolve_backend` picks ``reference`` instead and says so in one log line.

Adding one: subclass :class:`~hf_turbo.backends.base.Backend` (``prepare`` / ``write_kv`` / ``attend`` /
``release`` and optionally ``fused_ops``), add a branch to :func:`get_backend` and a name to ``BACKENDS``,
then run the suite with ``HF_TURBO_BACKEND=<name>``.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from hf_turbo.backends.base import STOCK_OPS, Backend, FusedOps
from hf_turbo.backends.kernels import flash_attention_varlen, paged_attention, store_kv, use_triton
from hf_turbo.backends.reference import ReferenceBackend

__all__ = ["BACKENDS", "BACKEND_ENV", "STOCK_OPS", "Backend", "FusedOps", "ReferenceBackend", "flash_attention_varlen",
           "get_backend", "kv_dtype_unsupported", "paged_attention", "resolve_backend", "store_kv", "use_triton"]

BACKENDS = ("auto", "triton", "reference", "cpu")
BACKEND_ENV = "HF_TURBO_BACKEND"

logger = logging.getLogger(__name__)


def resolve_backend(name: str, device: torch.device | str, kv_dtype: str = "auto") -> str:
    """The backend ``name`` ("auto" or one of ``BACKENDS``; ``HF_TURBO_BACKEND`` wins when set) means on ``device``
    for a KV cache of ``kv_dtype`` (an 8-bit one never gets ``cpu``: see the module docstring)."""
    resolved = _resolve(os.environ.get(BACKEND_ENV) or name, device)
    if resolved == "cpu" and kv_dtype != "auto":
        logger.info("KV cache %s: the reference backend instead of the CPU backend (whose contiguous float rows "
                    "would keep a full-precision copy of the cache)", kv_dtype)
        return "reference"
    why = kv_dtype_unsupported(kv_dtype, device) if resolved == "triton" else None
    if why is not None:
        raise ValueError(why)
    return resolved


def kv_dtype_unsupported(kv_dtype: str, device: torch.device | str) -> str | None:
    """Why an 8-bit ``kv_dtype`` cannot run on ``device``'s Triton kernels (None if it can): their fp8
    conversions need compute capability 8.9 (Ada, Hopper and later)."""
    device = torch.device(device)
    if kv_dtype.startswith("fp8") and device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            return (f"CacheConfig.kv_dtype {kv_dtype!r} needs a GPU of compute capability >= 8.9 (the Triton "
                    f"kernels' fp8 conversions); this one is {cap[0]}.{cap[1]}: use 'int8'")
    return None


def _resolve(name: str, device: torch.device | str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}"
                         + (f" (from {BACKEND_ENV})" if os.environ.get(BACKEND_ENV) else ""))
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            return "triton" if importlib.util.find_spec("triton") is not None else "reference"
        return "cpu" if device.type == "cpu" and _cpu_backend_present() else "reference"
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' runs on the CPU, but the model is on {device}")
    if name == "triton" and importlib.util.find_spec("triton") is None:
        raise ValueError("backend 'triton' needs the triton package, which is not installed")
    return name


def _cpu_backend_present() -> bool:
    try:
        import hf_turbo.backends.cpu  # noqa: F401
    except ImportError:
        return False
    return True


def get_backend(name: str, device: torch.device | str, kv_dtype: str = "auto") -> Backend:
    """A new backend instance for ``name`` on ``device`` and a KV cache of ``kv_dtype`` (see
    :func:`resolve_backend`)."""
    resolved = resolve_backend(name, device, kv_dtype)
    if resolved == "triton":
        from hf_turbo.backends.triton import TritonBackend

        return TritonBackend()
    if resolved == "cpu":
        from hf_turbo.backends.cpu import CpuBackend

        return CpuBackend()
    return ReferenceBackend()
