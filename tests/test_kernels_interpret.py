"""Triton kernels under TRITON_INTERPRET=1 (CPU) against the torch reference run in float64.

Tolerances (max |out - ref| / max |ref|, reference in float64 on the same rounded inputs):
  fp32 1e-5: fp32 accumulation, exp2-based softmax; the only rounding is fp32 (~1e-7 per op).
  fp16 2e-3: P is rounded to fp16 before the P@V dot and the output is stored in fp16, each a
             relative error of up to 2^-11 = 4.9e-4; 4x margin for the sum of the two.
  bf16 1.6e-2: the same two roundings in bf16, 2^-8 = 3.9e-3 each; 2x margin.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: @triton.jit then builds interpreted kernels

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from hf_turbo.backends import flash_attention_varlen, paged_attention, store_kv  # noqa: E402
from hf_turbo.backends.kv_quant import dequantize_kv, quantize_kv  # noqa: E402
from hf_turbo.backends.torch_kernels import (  # noqa: E402
    flash_attention_varlen_ref,
    paged_attention_ref,
    store_kv_ref,
)
from hf_turbo.backends.triton.flash_attention import flash_attention_varlen_triton  # noqa: E402
from hf_turbo.backends.triton.paged_attention import paged_attention_triton  # noqa: E402

pytestmark = pytest.mark.interpret

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
REPO = Path(__file__).resolve().parents[1]


# @triton.jit picks interpreted or compiled kernels when hf_turbo.backends.triton is imported. If an earlier test
# module imported triton first (e.g. through hf_turbo.patches), the kernels here are compiled ones that
# cannot run on CPU tensors: then this module runs itself in a subprocess with TRITON_INTERPRET=1.
_PAGED = sys.modules["hf_turbo.backends.triton.paged_attention"]
IN_PROCESS = isinstance(_PAGED._paged_attn_fwd_kernel, InterpretedFunction)


@pytest.fixture(autouse=True)
def _interpreted_or_skip(request):
    if not IN_PROCESS and request.node.name != "test_module_in_subprocess":
        pytest.skip("kernels imported before TRITON_INTERPRET=1: covered by test_module_in_subprocess")


def test_module_in_subprocess():
    if IN_PROCESS:
        pytest.skip("kernels are interpreted in this process: the tests ran directly")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        capture_output=True, text=True, timeout=900, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- factories


def make_paged(q_lens, ctx_lens, *, h_q=4, h_kv=2, d=64, block_size=16, dtype=torch.float32, seed=0):
    """Random paged batch. Block ids are a random permutation, block_tables is padded with -1, and
    every cache slot that is not a token of some sequence holds NaN (a kernel that reads it fails)."""
    g = torch.Generator().manual_seed(seed)
    n_blk = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(n_blk) + 2
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    bt = torch.full((len(ctx_lens), max(n_blk) + 1), -1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, h_kv, d), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    used = 0
    for s, (n, c) in enumerate(zip(n_blk, ctx_lens)):
        bt[s, :n] = perm[used : used + n]
        used += n
        slots = (bt[s, :n].long()[:, None] * block_size + torch.arange(block_size)).flatten()[:c]
        k_cache.view(-1, h_kv, d)[slots] = torch.randn(c, h_kv, d, generator=g).to(dtype)
        v_cache.view(-1, h_kv, d)[slots] = torch.randn(c, h_kv, d, generator=g).to(dtype)
    q = torch.randn(sum(q_lens), h_q, d, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k_cache, v_cache, cu, torch.tensor(ctx_lens, dtype=torch.int32), bt


def make_varlen(q_lens, k_lens, *, h_q=4, h_kv=2, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), h_q, d, generator=g).to(dtype)
    k = torch.randn(sum(k_lens), h_kv, d, generator=g).to(dtype)
    v = torch.randn(sum(k_lens), h_kv, d, generator=g).to(dtype)
    cq = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    ck = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cq, ck


def poisoned(q):
    return torch.full_like(q, float("nan"))


def assert_rel_close(out, ref, tol):
    assert torch.isfinite(out).all(), "output has NaN/inf (unwritten rows or unmasked reads)"
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e}"


def paged_ref64(q, kc, vc, cu, ctx, bt, **kw):
    return paged_attention_ref(q.double(), kc.double(), vc.double(), cu, ctx, bt, **kw)


# Small tiles so the interpreter covers several query blocks, key tiles and decode partitions.
SMALL = dict(block_m=16, block_n=16, partition_size=32, decode_block_n=16)


# ---------------------------------------------------------------------------------------------- store_kv


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv(slot_dtype, dtype):
    g = torch.Generator().manual_seed(1)
    k_cache = torch.randn(6, 16, 2, 64, generator=g).to(dtype)
    v_cache = torch.randn(6, 16, 2, 64, generator=g).to(dtype)
    key = torch.randn(7, 2, 64, generator=g).to(dtype)
    value = torch.randn(7, 2, 64, generator=g).to(dtype)
    slots = torch.tensor([5, -1, 17, 95, 16, -1, 40], dtype=slot_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(key, value, k_ref, v_ref, slots)
    store_kv(key, value, k_cache, v_cache, slots, backend="triton")
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


# ---------------------------------------------------------------------------------------------- paged


PAGED_CASES = [
    # q_lens, ctx_lens, h_q, h_kv, block_size, dtype, window, softcap
    ([1, 5, 37, 1, 17], [1, 40, 90, 77, 17], 4, 2, 16, torch.float32, None, None),
    ([5, 1, 37], [21, 50, 37], 2, 2, 32, torch.float32, 24, None),
    ([1, 37, 5], [33, 70, 5], 8, 2, 16, torch.float32, None, 10.0),
    ([37, 1, 5], [45, 90, 60], 8, 2, 32, torch.float32, 20, 10.0),
    ([1, 5, 37], [16, 40, 50], 4, 2, 16, torch.float16, None, None),
    ([5, 37, 1], [40, 37, 100], 8, 2, 16, torch.bfloat16, 30, None),
    ([37, 1], [60, 64], 2, 2, 32, torch.bfloat16, None, 5.0),
]


@pytest.mark.parametrize("case", PAGED_CASES, ids=lambda c: f"{c[5]}-g{c[2] // c[3]}-bs{c[4]}-w{c[6]}-cap{c[7]}")
def test_paged_attention(case):
    q_lens, ctx_lens, h_q, h_kv, bs, dtype, window, softcap = case
    q, kc, vc, cu, ctx, bt = make_paged(q_lens, ctx_lens, h_q=h_q, h_kv=h_kv, block_size=bs, dtype=dtype)
    kw = dict(scale=0.125, sliding_window=window, softcap=softcap)
    out = paged_attention_triton(q, kc, vc, cu, ctx, bt, out=poisoned(q), **kw, **SMALL)
    assert_rel_close(out, paged_ref64(q, kc, vc, cu, ctx, bt, **kw), TOL[dtype])


def test_paged_attention_long_prefill_default_tiles():
    """q_len 123 through the public API with the production tile sizes."""
    q, kc, vc, cu, ctx, bt = make_paged([123, 1, 5], [130, 19, 5], h_q=4, h_kv=2, block_size=16)
    out = paged_attention(q, kc, vc, cu, ctx, bt, scale=0.1, out=poisoned(q), backend="triton")
    assert_rel_close(out, paged_ref64(q, kc, vc, cu, ctx, bt, scale=0.1), TOL[torch.float32])


@pytest.mark.parametrize("window", [None, 50])
def test_paged_decode_split_k(window):
    """All q_len == 1 (decode kernels only), contexts spanning 1..7 partitions of 32 positions."""
    ctx_lens = [1, 31, 32, 33, 150, 200]
    q, kc, vc, cu, ctx, bt = make_paged([1] * 6, ctx_lens, h_q=8, h_kv=2, block_size=16, seed=3)
    kw = dict(scale=0.125, sliding_window=window)
    out = paged_attention_triton(q, kc, vc, cu, ctx, bt, out=poisoned(q), **kw, **SMALL)
    assert_rel_close(out, paged_ref64(q, kc, vc, cu, ctx, bt, **kw), TOL[torch.float32])


@pytest.mark.parametrize("fill", [0.0, float("nan")])
@pytest.mark.parametrize("q_lens, ctx_lens", [([1] * 6, [1, 31, 33, 90, 150, 200]), ([1, 37, 5], [45, 90, 60])])
def test_paged_attention_released_window_blocks(q_lens, ctx_lens, fill):
    """Sliding-window release (cache/sliding.py): table entries of blocks wholly before a sequence's window point
    at one scratch block. The kernels skip them (decode partitions and prefill tiles start at the window), so
    the output equals attention over the full table, even with NaN in that block."""
    window = 40
    q, kc, vc, cu, ctx, bt = make_paged(q_lens, ctx_lens, h_q=8, h_kv=2, block_size=16, seed=5)
    scratch = kc.shape[0]
    kc2 = torch.cat([kc, torch.full_like(kc[:1], fill)])
    vc2 = torch.cat([vc, torch.full_like(vc[:1], fill)])
    released = bt.clone()
    for s, (n, c) in enumerate(zip(q_lens, ctx_lens)):
        released[s, :max(0, c - n - window + 1) // 16] = scratch
    assert (released == scratch).any()
    kw = dict(scale=0.125, sliding_window=window)
    out = paged_attention_triton(q, kc2, vc2, cu, ctx, released, out=poisoned(q), **kw, **SMALL)
    assert_rel_close(out, paged_ref64(q, kc, vc, cu, ctx, bt, **kw), TOL[torch.float32])


@pytest.mark.parametrize(
    "d, dtype", [(80, torch.float32), (96, torch.float32), (128, torch.bfloat16), (256, torch.float32)]
)
def test_paged_attention_head_dims(d, dtype):
    q, kc, vc, cu, ctx, bt = make_paged([3, 1], [20, 40], h_q=2, h_kv=1, d=d, dtype=dtype, seed=d)
    out = paged_attention_triton(q, kc, vc, cu, ctx, bt, scale=d**-0.5, out=poisoned(q), **SMALL)
    assert_rel_close(out, paged_ref64(q, kc, vc, cu, ctx, bt, scale=d**-0.5), TOL[dtype])


def test_paged_attention_strided_q_and_out():
    """q and out are head slices of wider [T, 2 * H_q, D] buffers; the other half of out stays untouched."""
    q, kc, vc, cu, ctx, bt = make_paged([5, 1], [20, 40], h_q=4, h_kv=2, seed=9)
    q_buf = torch.randn(q.shape[0], 8, q.shape[2])
    q_buf[:, 4:] = q
    out_buf = torch.full_like(q_buf, float("nan"))
    paged_attention_triton(q_buf[:, 4:], kc, vc, cu, ctx, bt, scale=0.125, out=out_buf[:, :4], **SMALL)
    assert_rel_close(out_buf[:, :4], paged_ref64(q, kc, vc, cu, ctx, bt, scale=0.125), TOL[torch.float32])
    assert out_buf[:, 4:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_batch_invariance(dtype):
    """Each sequence alone (own narrow block table) == inside a mixed batch, bitwise."""
    q_lens, ctx_lens = [1, 9, 1, 20], [70, 30, 5, 20]
    q, kc, vc, cu, ctx, bt = make_paged(q_lens, ctx_lens, h_q=4, h_kv=2, dtype=dtype, seed=7)
    kw = dict(scale=0.125, softcap=8.0, sliding_window=40, partition_size=32, decode_block_n=16)
    full = paged_attention_triton(q, kc, vc, cu, ctx, bt, **kw)
    for s in range(len(q_lens)):
        q0, q1 = cu[s].item(), cu[s + 1].item()
        alone = paged_attention_triton(
            q[q0:q1], kc, vc, torch.tensor([0, q1 - q0], dtype=torch.int32), ctx[s : s + 1],
            bt[s : s + 1, : -(-ctx_lens[s] // 16)], **kw,
        )
        assert torch.equal(alone, full[q0:q1]), f"sequence {s} differs alone vs in batch"


# ---------------------------------------------------------------------------------------------- 8-bit KV cache


def quantized(kc, vc, kv_dtype):
    """8-bit pools and scales of make_paged's float pools; slots that hold no token get NaN scales (poison)."""
    out = []
    for c in (kc, vc):
        values, scales = quantize_kv(c.float().nan_to_num(0.0), kv_dtype)
        scales[c.isnan().any(-1)] = float("nan")
        out += [values, scales]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_int8_writes_the_reference_bits(dtype):
    g = torch.Generator().manual_seed(2)
    key = (torch.randn(7, 2, 64, generator=g) * torch.logspace(-3, 3, 7)[:, None, None]).to(dtype)
    value = torch.randn(7, 2, 64, generator=g).to(dtype)
    key[3] = 0.0  # an all-zero row: scale 1/127, values 0
    slots = torch.tensor([5, -1, 17, 95, 16, -1, 40])
    pools = []
    for backend in ("reference", "triton"):
        kc, vc = torch.full((6, 16, 2, 64), 99, dtype=torch.int8), torch.full((6, 16, 2, 64), 99, dtype=torch.int8)
        ks, vs = torch.full((6, 16, 2), float("nan")), torch.full((6, 16, 2), float("nan"))
        store_kv(key, value, kc, vc, slots, backend=backend, k_scale=ks, v_scale=vs)
        pools.append((kc, vc, ks, vs))
    for ref, tri in zip(*pools):
        assert torch.equal(ref.view(torch.uint8) if ref.dtype == torch.int8 else ref.nan_to_num(-1.0),
                           tri.view(torch.uint8) if tri.dtype == torch.int8 else tri.nan_to_num(-1.0))
    assert torch.equal(pools[1][2].view(-1, 2)[17], quantize_kv(key[2].float(), "int8")[1])


QUANT_CASES = [
    # q_lens, ctx_lens, h_q, h_kv, block_size, dtype, window, softcap, kv_dtype
    ([1, 5, 37, 1], [1, 40, 90, 77], 4, 2, 16, torch.float32, None, None, "int8"),
    ([37, 1, 5], [45, 90, 60], 8, 2, 32, torch.float32, 20, 10.0, "int8"),
    ([5, 37, 1], [40, 37, 100], 8, 2, 16, torch.bfloat16, 30, None, "int8"),
    ([1, 5, 37], [33, 70, 50], 4, 2, 16, torch.float32, None, None, "fp8_e4m3"),
    ([1] * 4, [1, 33, 150, 64], 4, 1, 16, torch.float32, None, None, "fp8_e5m2"),
]


@pytest.mark.parametrize("case", QUANT_CASES, ids=lambda c: f"{c[8]}-{c[5]}-w{c[6]}-cap{c[7]}")
def test_paged_attention_8bit(case):
    """Dequantized inside the kernel: the kernel over the dequantized float pools (bitwise in float32; in bf16 the
    interpreter's fp32 -> bf16 cast truncates where torch rounds, 2050 of 4096 values differ, so there within the
    bf16 tolerance: tests/test_gpu.py checks it bitwise), and the reference's 8-bit path within the tolerance."""
    q_lens, ctx_lens, h_q, h_kv, bs, dtype, window, softcap, kv_dtype = case
    q, kc, vc, cu, ctx, bt = make_paged(q_lens, ctx_lens, h_q=h_q, h_kv=h_kv, block_size=bs, dtype=dtype)
    k8, ks, v8, vs = quantized(kc, vc, kv_dtype)
    kw = dict(scale=0.125, sliding_window=window, softcap=softcap)
    out = paged_attention_triton(q, k8, v8, cu, ctx, bt, out=poisoned(q), k_scale=ks, v_scale=vs, **kw, **SMALL)
    kd, vd = dequantize_kv(k8, ks, dtype), dequantize_kv(v8, vs, dtype)
    over_float = paged_attention_triton(q, kd, vd, cu, ctx, bt, **kw, **SMALL)
    if dtype == torch.float32:
        assert torch.equal(out, over_float)
    else:
        assert_rel_close(out, over_float.double(), TOL[dtype])
    ref = paged_attention(q, k8, v8, cu, ctx, bt, k_scale=ks, v_scale=vs, backend="reference", **kw)
    assert_rel_close(out, ref.double(), 2 * TOL[dtype])  # both round in dtype: twice the float64 bound


# ---------------------------------------------------------------------------------------------- varlen


VARLEN_CASES = [
    # q_lens, k_lens, h_q, h_kv, dtype, causal, window, softcap
    ([1, 5, 123], [1, 40, 123], 4, 2, torch.float32, True, None, None),
    ([5, 37], [5, 60], 2, 2, torch.float32, False, None, None),
    ([37, 1], [50, 30], 8, 2, torch.float32, True, 20, None),
    ([5, 37], [9, 37], 4, 1, torch.float32, True, None, 7.0),
    ([37, 5], [37, 20], 4, 2, torch.float16, True, 16, None),
    ([5, 37], [30, 40], 8, 2, torch.bfloat16, True, None, 5.0),
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"{c[4]}-g{c[2] // c[3]}-causal{c[5]}-w{c[6]}-cap{c[7]}")
def test_flash_attention_varlen(case):
    q_lens, k_lens, h_q, h_kv, dtype, causal, window, softcap = case
    q, k, v, cq, ck = make_varlen(q_lens, k_lens, h_q=h_q, h_kv=h_kv, dtype=dtype, seed=len(q_lens))
    kw = dict(scale=0.125, causal=causal, sliding_window=window, softcap=softcap)
    out = flash_attention_varlen_triton(q, k, v, cq, ck, out=poisoned(q), block_m=16, block_n=16, **kw)
    ref = flash_attention_varlen_ref(q.double(), k.double(), v.double(), cq, ck, **kw)
    assert_rel_close(out, ref, TOL[dtype])


def test_flash_attention_varlen_head_dim_256_default_tiles():
    q, k, v, cq, ck = make_varlen([3, 1], [3, 10], h_q=2, h_kv=1, d=256, seed=11)
    out = flash_attention_varlen(q, k, v, cq, ck, scale=0.0625, out=poisoned(q), backend="triton")
    ref = flash_attention_varlen_ref(q.double(), k.double(), v.double(), cq, ck, scale=0.0625)
    assert_rel_close(out, ref, TOL[torch.float32])


def test_flash_attention_varlen_batch_invariance():
    q_lens, k_lens = [5, 1, 20], [30, 8, 20]
    q, k, v, cq, ck = make_varlen(q_lens, k_lens, h_q=4, h_kv=2, seed=5)
    kw = dict(scale=0.125, sliding_window=12, block_m=16, block_n=16)
    full = flash_attention_varlen_triton(q, k, v, cq, ck, **kw)
    for s in range(len(q_lens)):
        q0, q1, k0, k1 = cq[s].item(), cq[s + 1].item(), ck[s].item(), ck[s + 1].item()
        alone = flash_attention_varlen_triton(
            q[q0:q1], k[k0:k1], v[k0:k1], torch.tensor([0, q1 - q0], dtype=torch.int32),
            torch.tensor([0, k1 - k0], dtype=torch.int32), **kw,
        )
        assert torch.equal(alone, full[q0:q1]), f"sequence {s} differs alone vs in batch"


# ---------------------------------------------------------------------------------------------- gpu_check


def test_gpu_check_cpu_dry_run():
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-dry-run"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAIL" not in proc.stdout
