"""hf_turbo's C++ CPU ops (``csrc/``: one source file per op, bound in ``module.cpp``), built once per
machine and each checked bit for bit against what it replaces before anything uses it.

* ``decode_attention``: every single-query sequence of an engine step in one call, running the float
  operations of PyTorch's CPU flash-attention kernel per sequence (compiled for the CPU capability
  PyTorch dispatches to, with the flags PyTorch builds that capability's kernels with); checked against
  ``scaled_dot_product_attention`` on random inputs that cover vector tails, several 512-key blocks and
  1-40 query rows per KV head.
* ``scatter_kv``: a step's K/V rows written into a pool or the contiguous rows in one byte copy
  (``index_copy_`` costs ~10-20 us per call on a decode step).
* ``rope``, ``rms_norm``, ``silu_mul``: transformers' ``apply_rotary_pos_emb``, ``LlamaRMSNorm`` and the
  MLP's ``silu(gate) * up`` in one call each, checked bitwise against them.
* ``packed_gemm``: MKL's packed GEMM (``pack_weight``, ``packed_linear``) for :mod:`.packed`.

Each accessor below returns the op, or None where the build failed or the op's check missed (one
warning; the caller keeps the stock op). Decided once per process (``functools.cache``). Building needs
a C++ compiler and ninja (``torch.utils.cpp_extension``); it takes about a minute once (``make install``
does it ahead of time: :func:`build_ahead`), cached under ``TORCH_EXTENSIONS_DIR`` and keyed by a hash
of the sources and flags, behind an OS lock that a killed build releases (:mod:`.build`). A user who
wants none of it picks ``TurboConfig(backend="reference")``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["build_ahead", "clear", "decode_attention", "load", "packed_gemm", "rms_norm", "rope", "scatter_kv",
           "silu_mul"]

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(_CSRC / f"{name}.cpp" for name in ("module", "decode_attention", "scatter_kv", "rope", "rms_norm",
                                                    "silu_mul", "packed_gemm"))
# compiler flags PyTorch uses for its per-capability kernels (cmake/Codegen.cmake)
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


def _build():
    from hf_turbo.backends.cpu.build import load_cached

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
    return load_cached(f"hf_turbo_cpu_{capability.lower()}", SOURCES, flags, ["-fopenmp"])


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
    """Run one op's bitwise check; on a miss log which op is off (the caller keeps the stock op)."""
    miss = check(module)
    if miss is not None:
        logger.warning("hf_turbo's CPU %s in this build (%s); using the stock op", what, miss)
    return miss is None


@functools.cache
def load():
    """The built extension module, or None where it failed to build (logged once)."""
    try:
        return _build()
    except Exception as exc:  # no compiler, no ninja, unsupported platform: the stock ops
        first = str(exc).splitlines()[0] if str(exc) else ""
        logger.warning("hf_turbo's CPU ops are unavailable (%s: %s); using the stock ops", type(exc).__name__, first)
        return None


def _checked(name: str, check, what: str) -> Callable | None:
    module = load()
    op = getattr(module, name, None)
    if op is None:
        return None
    try:
        ok = check is None or _passes(check, module, what)
    except Exception as exc:  # a check that cannot run is a miss
        logger.warning("hf_turbo's CPU %s could not be checked (%s: %s); using the stock op", name,
                       type(exc).__name__, exc)
        ok = False
    return op if ok else None


def clear() -> None:
    """Forget every decision above (tests that fake a build)."""
    for fn in (load, decode_attention, scatter_kv, rope, rms_norm, silu_mul, packed_gemm):
        fn.cache_clear()


@functools.cache
def decode_attention() -> Callable | None:
    """``f(q, k_arena, v_arena, rows, slots, lens, scale, out)``: ``out[rows[i]] = SDPA(q[rows[i]],
    k_arena[slots[i], :, :lens[i]], v_arena[...])`` for every i, bitwise; or None.

    q, out: [T, H_kv, g, D] contiguous fp32 (g query heads per KV head as rows); arenas [S, H_kv, C, D];
    rows, slots, lens: int64 CPU tensors.
    """
    return _checked("decode_attention", _self_check, "decode attention differs from scaled_dot_product_attention")


@functools.cache
def scatter_kv() -> Callable | None:
    """``f(k, v, k_dst, v_dst, index, block)``: ``k_dst[index[n] // block, h, index[n] % block] = k[n, h]`` for
    every token n and head h (v likewise); a byte copy (any dtype), or None.

    k, v: [N, H, D]; k_dst, v_dst: [A, H, block, D] views of one layout (last dims contiguous); index int64 [N].
    """
    return _checked("scatter_kv", None, "")


@functools.cache
def rope() -> Callable | None:
    """``f(q, k, cos, sin) -> (q, k)``: transformers' ``apply_rotary_pos_emb``, bitwise, in one call (float32;
    q [1, Hq, T, D], k [1, Hk, T, D], cos/sin [1, T, D]; returns [1, H, T, D] views of [1, T, H, D]); or None."""
    return _checked("rope", _rope_check, "rotary embedding differs from transformers'")


@functools.cache
def rms_norm() -> Callable | None:
    """``f(x, weight, eps)``: transformers' ``LlamaRMSNorm`` forward, bitwise, in one call (float32 CPU; where
    the one-call sum could round differently from ATen's it runs ATen's ops); or None."""
    return _checked("rms_norm", _rms_check, "RMSNorm differs from transformers'")


@functools.cache
def silu_mul() -> Callable | None:
    """``f(gate, up)``: ``F.silu(gate) * up`` in one pass, bitwise where torch runs the silu as one chunk (one
    thread, or under 32,768 elements: the caller checks); contiguous float32 tensors of one shape; or None."""
    return _checked("silu_mul", _silu_mul_check, "silu(gate) * up differs from torch's")


@functools.cache
def packed_gemm() -> tuple[Callable, Callable] | None:
    """``(pack_weight, packed_linear)``: MKL's packed GEMM where the BLAS torch links has it, else None.

    ``pack_weight(W [N, K])`` -> a byte tensor; ``packed_linear(x, packed, N, K, bias)`` = ``F.linear(x, W, bias)``
    in value, but whether MKL rounds it the same way depends on the shapes: :mod:`.packed` compares first.
    """
    module = load()
    if module is None or not getattr(module, "packed_gemm_available", lambda: False)():
        return None
    return module.pack_weight, module.packed_linear


def build_ahead() -> bool:
    """Build and check the extension now (``make install`` calls it); prints and returns whether it is ready."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ok = decode_attention() is not None
    print("hf_turbo CPU ops:", "ready" if ok else "unavailable (the CPU backend uses the stock ops)")
    return ok
