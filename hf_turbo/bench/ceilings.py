"""What this machine can do at best, measured in the same process as the benchmark.

Two ceilings: dense matmul throughput (GFLOP/s, ``2 n^3`` per ``n x n`` matmul) and memory copy
bandwidth (GB/s, read + write bytes of ``dst.copy_(src)``). Each is the median of a few timed runs
after one untimed run. Plus a description of the machine for the report.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import torch

__all__ = ["Ceilings", "machine_info", "measure_ceilings", "model_matmul_params"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ceilings:
    """Measured peaks.

    Attributes:
        matmul_gflops: dtype name (``"float32"``, ``"bfloat16"``) -> GFLOP/s of an ``n x n`` matmul.
        matmul_size: ``n``.
        memcpy_gbps: GB/s (1e9 bytes) of a large tensor copy, read + write bytes counted.
        memcpy_mib: size of the copied tensor in MiB.
    """

    matmul_gflops: dict[str, float]
    matmul_size: int
    memcpy_gbps: float
    memcpy_mib: int

    def compute_gflops(self, dtype: torch.dtype) -> float:
        """The matmul ceiling for ``dtype`` (falls back to float32)."""
        name = str(dtype).removeprefix("torch.")
        return self.matmul_gflops.get(name, self.matmul_gflops["float32"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # untimed: first-call allocation and kernel selection
    sync()
    times = []
    for _ in range(repeats):
        start = perf_counter()
        fn()
        sync()
        times.append(perf_counter() - start)
    return statistics.median(times)


def _matmul_gflops(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = _median_seconds(lambda: torch.matmul(a, b, out=out), device, repeats)
    return 2 * n**3 / seconds / 1e9


def _memcpy_gbps(mib: int, device: torch.device, repeats: int) -> float:
    numel = mib * 2**20 // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), device, repeats)
    return 2 * numel * 4 / seconds / 1e9


def measure_ceilings(device: torch.device, dtype: torch.dtype, *, quick: bool = False) -> Ceilings:
    """Measure the matmul (float32, and ``dtype`` if different) and memory-copy ceilings on ``device``."""
    if device.type == "cuda":
        n, mib = (4096, 512) if quick else (8192, 1024)
    else:
        n, mib = (1024, 64) if quick else (2048, 256)
    repeats = 3 if quick else 5
    gflops = {"float32": _matmul_gflops(n, torch.float32, device, repeats)}
    if dtype != torch.float32:
        gflops[str(dtype).removeprefix("torch.")] = _matmul_gflops(n, dtype, device, repeats)
    ceilings = Ceilings(gflops, n, _memcpy_gbps(mib, device, repeats), mib)
    logger.info("ceilings: matmul %s GFLOP/s (n=%d), memcpy %.1f GB/s", gflops, n, ceilings.memcpy_gbps)
    return ceilings


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """CPU model, cores, threads, library versions, device and dtype."""
    import transformers

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def model_matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: all, minus the input embedding (a lookup).

    A tied LM head shares the embedding's tensor but is a matmul, so it stays counted.
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    if not tied:
        total -= embed.weight.numel()
    return total
