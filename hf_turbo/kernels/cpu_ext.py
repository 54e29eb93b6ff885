"""The batched CPU decode attention (``csrc/cpu_decode_attention.cpp``), built on first use.

The engine's CPU path attends each single-query sequence with its own
``scaled_dot_product_attention`` call, because padding sequences into one call changes the kernel's
bits. This C++ extension runs the same float operations as PyTorch's CPU flash-attention kernel for
each sequence, but for all of a step's sequences in one call (no per-call dispatch, allocation and
Python glue, and one pass over the K/V rows that the hardware prefetchers can follow).

It is used only where it is bitwise equal to ``scaled_dot_product_attention``:

* it is compiled for the CPU capability PyTorch dispatches to (``torch.backends.cpu.get_cpu_capability()``),
  with the flags PyTorch builds that capability's kernels with;
* before first use, :func:`load` compares it with ``scaled_dot_product_attention`` on random inputs
  that cover vector tails, several 512-key blocks, and 1-40 query rows per KV head; any difference
  disables it for the process (one warning), and the engine keeps its per-sequence calls.

Small helpers ride along: :func:`scatter_kv` writes a step's K/V rows into the paged pool or the
contiguous rows in one call (a byte copy; ``index_copy_`` costs ~10-20 us per call on a decode
step), and :func:`rope` computes transformers' ``apply_rotary_pos_emb`` in one call instead of 16 ops
(checked bitwise against it at load; a miss turns only the rope off); :func:`rms_norm` does the same
for transformers' RMSNorm (7 ops) and :func:`silu_mul` for the MLP's ``silu(gate) * up``;
:func:`pack_weight` and :func:`packed_linear` expose MKL's packed GEMM for ``hf_turbo.kernels.packed``.

Building needs a C++ compiler and ninja (``torch.utils.cpp_extension``); it takes about a minute once
(``make install`` does it ahead of time: :func:`build_ahead`), and the result is cached
under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), keyed by a hash of the source and
flags, behind an OS lock that a killed build releases (``hf_turbo.kernels.ext_build``). When the build
fails, the same fallback applies. ``HF_TURBO_NO_CPU_EXT=1`` turns the extension off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["available", "build_ahead", "decode_attention", "load", "pack_weight", "packed_gemm_ready",
           "packed_linear", "ready", "rms_norm", "rms_norm_ready", "rope", "rope_ready", "scatter_kv", "silu_mul",
           "silu_mul_ready"]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "cpu_decode_attention.cpp"
# compiler flags PyTorch uses for its per-capability kernels (cmake/Codegen.cmake)
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}

_lock = threading.Lock()
_module = None
_state = "unloaded"  # "unloaded" | "ready" | "off"
_rope_ok = False  # the rope passed its check (load)
_packed_ok = False  # the BLAS torch links has MKL's packed GEMM (load)
_rms_ok = False  # the RMSNorm passed its check (load)
_silu_ok = False  # silu_mul passed its check (load)


def _build():
    from hf_turbo.kernels.ext_build import load_cached

    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in _CAPABILITY_FLAGS:
        raise RuntimeError(f"no build flags for CPU capability {capability!r}")
    # -fopenmp: at::parallel_for is inline OpenMP code; without it the call would run on one thread
    flags = ["-O2", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", f"-DCPU_CAPABILITY={capability}",
             f"-DCPU_CAPABILITY_{capability}", *_CAPABILITY_FLAGS[capability]]
    env_bin = str(Path(sys.executable).parent)  # the `ninja` pip package's binary sits beside the interpreter
    path = os.environ.get("PATH", "")
    if env_bin not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([path, env_bin]) if path else env_bin
    return load_cached(f"hf_turbo_cpu_{capability.lower()}", [_SOURCE], flags, ["-fopenmp"])


def _self_check(module) -> str | None:
    """None if the extension equals SDPA bitwise on random cases, else a description of the first miss."""
    gen = torch.Generator().manual_seed(1234)
    for h_kv, g, d, cap, lens in [
        (2, 2, 64, 1100, [1, 7, 16, 17, 33, 100, 511, 512, 513, 700, 1024, 1025, 1100]),
        (1, 1, 64, 40, [1, 3, 40]),
        (3, 4, 32, 600, [5, 129, 600]),
        (2, 8, 48, 530, [31, 520]),
        (1, 40, 8, 1100, [33, 1023, 1100]),  # two query blocks
        (4, 1, 128, 70, [2, 70]),
    ]:
        n = len(lens)
        q = torch.randn(n + 1, h_kv, g, d, generator=gen)
        k = torch.randn(n + 2, h_kv, cap, d, generator=gen)
        v = torch.randn(n + 2, h_kv, cap, d, generator=gen)
        k[..., 0] *= 8  # spread the scores so that the softmax is far from uniform
        rows = torch.arange(1, n + 1)
        slots = torch.arange(n + 1, 1, -1)
        out = torch.zeros_like(q)
        scale = d ** -0.5
        module.decode_attention(q, k, v, rows, slots, torch.tensor(lens), scale, out)
        for i, length in enumerate(lens):
            r, s = int(rows[i]), int(slots[i])
            ref = F.scaled_dot_product_attention(q[r:r + 1], k[s:s + 1, :, :length], v[s:s + 1, :, :length],
                                                 scale=scale)
            if not torch.equal(ref[0], out[r]):
                diff = (ref[0] - out[r]).abs().max().item()
                return f"H_kv={h_kv} g={g} D={d} L={length}: max abs difference {diff:.3g}"
        if out[0].abs().sum() != 0:
            return "wrote a row it was not given"
    return None


def _rope_check(module) -> str | None:
    """None if the extension's rope equals transformers' ``apply_rotary_pos_emb`` bitwise, else the first miss."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(4321)
    for h_q, h_k, t, d in [(4, 2, 1, 64), (4, 2, 37, 64), (8, 1, 5, 128), (3, 3, 16, 32), (2, 2, 9, 80)]:
        q = torch.randn(1, t, h_q, d, generator=gen).transpose(1, 2) * 30  # [1, H, T, D] over [1, T, H, D]
        k = torch.randn(1, h_k, t, d, generator=gen)
        angles = torch.rand(1, t, d // 2, generator=gen) * 1000
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
        got_q, got_k = module.rope(q, k, cos, sin)
        for name, ref, got in (("q", ref_q, got_q), ("k", ref_k, got_k)):
            if not torch.equal(ref, got):
                diff = (ref - got).abs().max().item()
                return f"{name} of H={ref.shape[1]} T={t} D={d}: max abs difference {diff:.3g}"
    return None


@contextlib.contextmanager
def _threads(n: int):
    """torch's CPU thread count set to ``n`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rms_check(module) -> str | None:
    """None if the extension's RMSNorm equals transformers' ``LlamaRMSNorm`` bitwise, else the first miss."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(2468)
    for shape, eps in [((1, 1, 256), 1e-6), ((1, 16, 256), 1e-6), ((1, 37, 200), 1e-5), ((1, 5, 7), 1e-6),
                       ((1, 3, 4, 64), 1e-6), ((1, 2, 1000), 1e-5), ((1, 300, 33), 1e-6), ((1, 1, 5120), 1e-5)]:
        norm = LlamaRMSNorm(shape[-1], eps=eps)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(shape[-1], generator=gen) * 0.5 + 1)
        x = torch.randn(shape, generator=gen) * torch.exp(2 * torch.randn(shape, generator=gen))
        for n in sorted({1, torch.get_num_threads()}):
            with _threads(n), torch.no_grad():
                ref, got = norm(x), module.rms_norm(x, norm.weight, eps)
            if not torch.equal(ref, got):
                diff = (ref - got).abs().max().item()
                return f"shape {tuple(shape)}, {n} threads: max abs difference {diff:.3g}"
    return None


def _silu_mul_check(module) -> str | None:
    """None if the extension's ``silu_mul`` equals ``F.silu(gate) * up`` bitwise, else the first miss."""
    gen = torch.Generator().manual_seed(1357)
    for n in [*range(1, 70), 1000, 1007, 11264, 32767]:
        for scale in (0.01, 1.0, 8.0, 60.0):
            gate = torch.randn(1, n, generator=gen) * scale
            up = torch.randn(1, n, generator=gen)
            if n == 1000:
                gate[0, :8] = torch.tensor([0.0, -0.0, 88.0, -88.0, 104.0, -104.0, 1e-30, -1e-30])
            with _threads(1):  # one chunk, as the engine uses it
                ref, got = F.silu(gate) * up, module.silu_mul(gate, up)
            if not torch.equal(ref, got):
                diff = (ref - got).abs().max().item()
                return f"{n} elements at scale {scale}: max abs difference {diff:.3g}"
    return None


def _passes(check, module, what: str) -> bool:
    """Run one helper's bitwise check; on a miss log which helper is off (the caller keeps the stock op)."""
    miss = check(module)
    if miss is not None:
        logger.warning("hf_turbo's CPU %s in this build (%s); using the stock op", what, miss)
    return miss is None


def load():
    """The extension module, or None where it is off, failed to build, or is not bitwise equal to SDPA."""
    global _module, _state
    if _state == "ready":
        return _module
    if _state == "off":
        return None
    with _lock:
        if _state != "unloaded":
            return _module
        if os.environ.get("HF_TURBO_NO_CPU_EXT", "") == "1":
            _state = "off"
            return None
        try:
            module = _build()
        except Exception as exc:  # no compiler, no ninja, unsupported platform: per-sequence SDPA calls
            logger.warning("hf_turbo's CPU decode attention is unavailable (%s: %s); using one SDPA call "
                           "per sequence", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            _state = "off"
            return None
        miss = _self_check(module)
        if miss is not None:
            logger.warning("hf_turbo's CPU decode attention differs from scaled_dot_product_attention in this "
                           "torch build (%s); using one SDPA call per sequence", miss)
            _state = "off"
            return None
        global _rope_ok, _rms_ok, _silu_ok, _packed_ok
        _rope_ok = _passes(_rope_check, module, "rotary embedding differs from transformers'")
        _rms_ok = _passes(_rms_check, module, "RMSNorm differs from transformers'")
        _silu_ok = _passes(_silu_mul_check, module, "silu(gate) * up differs from torch's")
        _packed_ok = bool(module.packed_gemm_available())
        _module, _state = module, "ready"
        return _module


def available() -> bool:
    """Whether :func:`decode_attention` runs the extension (builds and checks it on the first call)."""
    return load() is not None


def ready() -> bool:
    """Whether the extension is loaded and checked; unlike :func:`available` this never builds it."""
    return _state == "ready"


def rope_ready() -> bool:
    """Whether :func:`rope` may be used (the extension is ready and its rope passed the check); never builds."""
    return _state == "ready" and _rope_ok


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb(q, k, cos, sin)`` of transformers, bitwise, in one call (float32).

    q [1, Hq, T, D], k [1, Hk, T, D], cos/sin [1, T, D]; returns [1, H, T, D] views of [1, T, H, D]
    memory. Call only when :func:`rope_ready`.
    """
    out_q, out_k = _module.rope(q, k, cos, sin)
    return out_q, out_k


def rms_norm_ready() -> bool:
    """Whether :func:`rms_norm` may be used (the extension is ready and its RMSNorm passed the check)."""
    return _state == "ready" and _rms_ok


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm`` forward, bitwise, in one call: x [..., H], weight [H], float32 CPU.

    Where the single-call sum could round differently from ATen's (a strided last dim; one row of
    32,768+ floats on several threads) it runs ATen's ops instead. Call only when :func:`rms_norm_ready`.
    """
    return _module.rms_norm(x, weight, eps)


def silu_mul_ready() -> bool:
    """Whether :func:`silu_mul` may be used (the extension is ready and it passed its check); never builds."""
    return _state == "ready" and _silu_ok


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` in one pass, bitwise: contiguous float32 CPU tensors of one shape.

    Bitwise only where torch runs the silu as one chunk: a single thread, or fewer than 32,768 elements
    (the caller checks). Call only when :func:`silu_mul_ready`.
    """
    return _module.silu_mul(gate, up)


def packed_gemm_ready() -> bool:
    """Whether :func:`pack_weight` and :func:`packed_linear` may be used (MKL's packed GEMM); never builds."""
    return _state == "ready" and _packed_ok


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """A float32 [N, K] weight packed into MKL's GEMM layout (a byte tensor) for :func:`packed_linear`."""
    return _module.pack_weight(w)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, in_features: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` on ``packed = pack_weight(W)``: x [..., K] contiguous float32 -> [..., N].

    The same product as ``F.linear(x, W, bias)``, but whether MKL rounds it the same way depends on the
    shapes: compare before relying on it (``hf_turbo.kernels.packed``). Call only when
    :func:`packed_gemm_ready`.
    """
    return _module.packed_linear(x, packed, out_features, in_features, bias)


def scatter_kv(k: torch.Tensor, v: torch.Tensor, k_dst: torch.Tensor, v_dst: torch.Tensor, index: torch.Tensor,
               block: int) -> None:
    """``k_dst[index[n] // block, h, index[n] % block] = k[n, h]`` for every token n and head h (v likewise).

    k, v: [N, H, D]; k_dst, v_dst: [A, H, block, D] views of one layout (last dims contiguous);
    index: int64 [N]. A byte copy (any dtype). Call only when :func:`ready`.
    """
    _module.scatter_kv(k, v, k_dst, v_dst, index, block)


def decode_attention(q: torch.Tensor, k_arena: torch.Tensor, v_arena: torch.Tensor, rows: torch.Tensor,
                     slots: torch.Tensor, lens: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """Write ``out[rows[i]] = SDPA(q[rows[i]], k_arena[slots[i], :, :lens[i]], v_arena[...])`` for every i.

    q, out: [T, H_kv, g, D] contiguous fp32 (g query heads per KV head as rows); arenas
    [S, H_kv, C, D]; rows, slots, lens: int64 CPU tensors. Call :func:`available` first.
    """
    _module.decode_attention(q, k_arena, v_arena, rows, slots, lens, scale, out)


def build_ahead() -> bool:
    """Build and check the extension now (``make install`` calls it); prints and returns whether it is ready."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ok = available()
    print("hf_turbo CPU extension:", "ready" if ok else "unavailable (the engine uses per-sequence calls)")
    return ok
