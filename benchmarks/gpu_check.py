"""GPU check for hf_turbo's attention kernels: correctness against the torch reference, then timings.

    benchmarks/gpu_check.sh                      # CUDA box, about 5 minutes
    benchmarks/gpu_check.sh --sweep              # also try a few tile configs (prefill 4k, decode 32 x 4k)
    python benchmarks/gpu_check.py --cpu-dry-run # CPU, TRITON_INTERPRET=1, tiny sizes, seconds

1. every kernel (store_kv, paged unified, split-K decode + reduce, contiguous varlen) vs the reference
   run in float64 on random inputs: max abs error, relative error, PASS/FAIL; batch invariance (bitwise).
2. prefill TFLOP/s (bf16, causal, D=128, H=32) of flash_attention_varlen and paged_attention vs
   torch SDPA restricted to the flash backend; decode GB/s of paged_attention (H_q=32, H_kv=8, D=128,
   bf16, block 16) vs a device-to-device copy measured in the same run.
Exit code 1 if any correctness check fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 2e-2}  # rel to max|ref|; GPU exp2 is approximate
PREFILL_TARGET, DECODE_TARGET = 0.8, 0.7


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true", help="run everything on CPU under TRITON_INTERPRET=1")
    p.add_argument("--sweep", action="store_true", help="also time a few tile configurations")
    p.add_argument("--skip-timing", action="store_true")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.cpu_dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the triton / hf_turbo.backends imports
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("no CUDA device; use --cpu-dry-run")
        return 2
    ctx = Context(torch.device("cpu" if args.cpu_dry_run else "cuda"), dry=args.cpu_dry_run)
    ctx.print_header()
    ok = run_correctness(ctx)
    if not args.skip_timing:
        run_timings(ctx)
        if args.sweep:
            run_sweep(ctx)
    print(f"\nOVERALL: {'PASS' if ok else 'FAIL'}  ({time.perf_counter() - ctx.t0:.0f}s)")
    return 0 if ok else 1


class Context:
    def __init__(self, device, dry: bool) -> None:
        import torch
        import triton

        from hf_turbo.backends import kernels
        from hf_turbo.backends.triton import flash_attention, paged_attention

        self.torch, self.triton, self.kernels = torch, triton, kernels
        self.paged_mod = paged_attention
        self.flash_mod = flash_attention
        self.device, self.dry, self.t0 = device, dry, time.perf_counter()
        self.gen = torch.Generator(device=device).manual_seed(0)

    def print_header(self) -> None:
        t = self.torch
        dev = t.cuda.get_device_name() if self.device.type == "cuda" else "CPU (TRITON_INTERPRET=1)"
        print(f"device: {dev} | torch {t.__version__} | triton {self.triton.__version__}")

    def randn(self, *shape, dtype):
        return self.torch.randn(*shape, generator=self.gen, device=self.device).to(dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def bench_ms(self, fn) -> float:
        if self.device.type == "cuda":
            return self.triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


# ---------------------------------------------------------------------------------------------- inputs


def make_paged(c: Context, q_lens, ctx_lens, h_q, h_kv, d, dtype, block_size=16):
    """Random paged batch: blocks in random order, cache slots outside every context are NaN."""
    torch = c.torch
    n_blk = [-(-n // block_size) for n in ctx_lens]
    num_blocks = sum(n_blk) + 1
    perm = torch.randperm(num_blocks, generator=c.gen, device=c.device).to(torch.int32)
    bt = torch.full((len(ctx_lens), max(n_blk)), -1, dtype=torch.int32, device=c.device)
    k_cache = torch.full((num_blocks, block_size, h_kv, d), float("nan"), dtype=dtype, device=c.device)
    v_cache = torch.full_like(k_cache, float("nan"))
    slots, used = [], 0
    for s, n in enumerate(n_blk):
        bt[s, :n] = perm[used : used + n]
        used += n
        blocks = bt[s, :n].long()[:, None] * block_size + torch.arange(block_size, device=c.device)
        slots.append(blocks.flatten()[: ctx_lens[s]])
    slots = torch.cat(slots)
    total = slots.shape[0]
    c.kernels.store_kv(c.randn(total, h_kv, d, dtype=dtype), c.randn(total, h_kv, d, dtype=dtype), k_cache,
                       v_cache, slots, backend="reference")
    q = c.randn(sum(q_lens), h_q, d, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=c.device)
    return q, k_cache, v_cache, cu, torch.tensor(ctx_lens, dtype=torch.int32, device=c.device), bt


def make_varlen(c: Context, q_lens, k_lens, h_q, h_kv, d, dtype):
    torch = c.torch
    cq = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=c.device)
    ck = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32, device=c.device)
    return (c.randn(sum(q_lens), h_q, d, dtype=dtype), c.randn(sum(k_lens), h_kv, d, dtype=dtype),
            c.randn(sum(k_lens), h_kv, d, dtype=dtype), cq, ck)


# ---------------------------------------------------------------------------------------------- correctness


def report(name: str, out, ref, dtype_name: str) -> bool:
    err = (out.double() - ref.double()).abs().max().item()
    rel = err / max(ref.double().abs().max().item(), 1e-30)
    finite = bool(out.isfinite().all())
    ok = finite and rel <= TOL[dtype_name]
    print(f"  {name:<58} max_abs={err:.2e} rel={rel:.2e} tol={TOL[dtype_name]:.0e} {'PASS' if ok else 'FAIL'}")
    return ok


def failed(name: str, e: Exception) -> bool:
    print(f"  {name:<58} {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''} FAIL")
    return False


def run_correctness(c: Context) -> bool:
    torch, k = c.torch, c.kernels
    dry = c.dry
    print("\n== correctness vs float64 reference")
    ok = True

    # -- store_kv: exact copy
    for dtype, slot_dtype in ((torch.bfloat16, torch.int32), (torch.float32, torch.int64)):
        kc = c.randn(8, 16, 4, 128, dtype=dtype)
        vc = c.randn(8, 16, 4, 128, dtype=dtype)
        key, val = c.randn(9, 4, 128, dtype=dtype), c.randn(9, 4, 128, dtype=dtype)
        slots = torch.tensor([3, -1, 17, 127, 64, 65, -1, 0, 90], dtype=slot_dtype, device=c.device)
        kr, vr = kc.clone(), vc.clone()
        k.store_kv(key, val, kr, vr, slots, backend="reference")
        k.store_kv(key, val, kc, vc, slots, backend="triton")
        same = torch.equal(kc, kr) and torch.equal(vc, vr)
        print(f"  {'store_kv ' + str(dtype) + ' ' + str(slot_dtype):<58} exact={same} {'PASS' if same else 'FAIL'}")
        ok &= same

    # -- paged: (q_lens, ctx_lens, h_q, h_kv, d, dtype, window, softcap)
    if dry:
        paged_cases = [([1, 5, 1], [9, 20, 40], 4, 2, 64, torch.float32, None, None),
                       ([3, 1], [10, 25], 4, 1, 64, torch.bfloat16, 8, 5.0)]
    else:
        mixed_q, mixed_ctx = [1, 7, 1, 300, 1000, 1], [2000, 100, 17, 300, 1500, 1]
        paged_cases = [
            (mixed_q, mixed_ctx, 32, 8, 128, torch.bfloat16, None, None),
            (mixed_q, mixed_ctx, 32, 8, 128, torch.bfloat16, 256, 30.0),
            (mixed_q, mixed_ctx, 8, 8, 64, torch.float16, None, None),
            (mixed_q, mixed_ctx, 8, 4, 128, torch.float32, None, None),
            (mixed_q, mixed_ctx, 8, 4, 256, torch.bfloat16, 500, None),
            (mixed_q, mixed_ctx, 16, 4, 80, torch.bfloat16, None, None),
            ([1, 1, 1, 1], [5000, 1, 513, 2048], 32, 8, 128, torch.bfloat16, None, None),  # decode only
        ]
    for q_lens, ctx_lens, h_q, h_kv, d, dtype, window, softcap in paged_cases:
        q, kc, vc, cu, cl, bt = make_paged(c, q_lens, ctx_lens, h_q, h_kv, d, dtype)
        kw = dict(scale=d**-0.5, sliding_window=window, softcap=softcap)
        name = f"paged {str(dtype)[6:]} d{d} g{h_q // h_kv} w{window} cap{softcap} q{sum(q_lens)} ctx{max(ctx_lens)}"
        try:
            out = k.paged_attention(q, kc, vc, cu, cl, bt, out=torch.full_like(q, float("nan")), backend="triton",
                                    **kw)
        except Exception as e:  # a compile or launch failure is a FAIL row, not the end of the check
            ok = failed(name, e)
            continue
        ref = k.paged_attention(q.double(), kc.double(), vc.double(), cu, cl, bt, backend="reference", **kw)
        ok &= report(name, out, ref, str(dtype)[6:])

    # -- varlen: (q_lens, k_lens, h_q, h_kv, d, dtype, causal, window, softcap)
    if dry:
        varlen_cases = [([1, 9], [5, 30], 4, 2, 64, torch.float32, True, None, None),
                        ([4, 7], [4, 20], 2, 2, 64, torch.float16, False, None, None)]
    else:
        vq, vk = [1, 300, 1000, 5], [40, 300, 1200, 5]
        varlen_cases = [
            (vq, vk, 32, 8, 128, torch.bfloat16, True, None, None),
            (vq, vk, 32, 8, 128, torch.bfloat16, False, None, None),
            (vq, vk, 32, 8, 128, torch.bfloat16, True, 256, 30.0),
            (vq, vk, 8, 8, 64, torch.float32, True, None, None),
            (vq, vk, 8, 2, 256, torch.float16, True, None, None),
        ]
    for q_lens, k_lens, h_q, h_kv, d, dtype, causal, window, softcap in varlen_cases:
        q, kk, vv, cq, ck = make_varlen(c, q_lens, k_lens, h_q, h_kv, d, dtype)
        kw = dict(scale=d**-0.5, causal=causal, sliding_window=window, softcap=softcap)
        name = f"varlen {str(dtype)[6:]} d{d} g{h_q // h_kv} causal={causal} w{window} cap{softcap}"
        try:
            out = k.flash_attention_varlen(q, kk, vv, cq, ck, out=torch.full_like(q, float("nan")),
                                           backend="triton", **kw)
        except Exception as e:
            ok = failed(name, e)
            continue
        ref = k.flash_attention_varlen(q.double(), kk.double(), vv.double(), cq, ck, backend="reference", **kw)
        ok &= report(name, out, ref, str(dtype)[6:])

    # -- batch invariance: each sequence alone == inside the mixed batch, bitwise
    q_lens, ctx_lens = ([1, 5, 1], [9, 20, 40]) if dry else ([1, 7, 1, 300, 1], [2000, 100, 17, 300, 700])
    q, kc, vc, cu, cl, bt = make_paged(c, q_lens, ctx_lens, 8, 2, 64 if dry else 128, torch.bfloat16)
    full = k.paged_attention(q, kc, vc, cu, cl, bt, scale=0.1, backend="triton")
    same = True
    for s in range(len(q_lens)):
        q0, q1 = sum(q_lens[:s]), sum(q_lens[: s + 1])
        one = torch.tensor([0, q1 - q0], dtype=torch.int32, device=c.device)
        alone = k.paged_attention(q[q0:q1], kc, vc, one, cl[s : s + 1], bt[s : s + 1], scale=0.1, backend="triton")
        same &= torch.equal(alone, full[q0:q1])
    print(f"  {'paged batch invariance (alone == in mixed batch, bitwise)':<58} {'PASS' if same else 'FAIL'}")
    ok &= same
    return ok


# ---------------------------------------------------------------------------------------------- timings


def prefill_inputs(c: Context, n: int, h: int, d: int):
    torch = c.torch
    q, kk, vv, cq, ck = make_varlen(c, [n], [n], h, h, d, torch.bfloat16)
    kc = kk.view(-1, 16, h, d)  # contiguous blocks 0..n/16-1 in order
    vc = vv.view(-1, 16, h, d)
    bt = torch.arange(n // 16, dtype=torch.int32, device=c.device)[None]
    cl = torch.tensor([n], dtype=torch.int32, device=c.device)
    return q, kk, vv, cq, ck, kc, vc, bt, cl


def time_prefill(c: Context, n: int, h: int, d: int, **tile) -> tuple[float, float, float | None]:
    """Returns (flash varlen ms, paged ms, SDPA flash ms or None)."""
    torch = c.torch
    q, kk, vv, cq, ck, kc, vc, bt, cl = prefill_inputs(c, n, h, d)
    scale = d**-0.5
    t_flash = c.bench_ms(lambda: c.flash_mod.flash_attention_varlen_triton(
        q, kk, vv, cq, ck, scale=scale, validate=False, **tile))
    t_paged = c.bench_ms(lambda: c.paged_mod.paged_attention_triton(
        q, kc, vc, cq, cl, bt, scale=scale, validate=False, **tile))
    if tile:
        return t_flash, t_paged, None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q4, k4, v4 = (t.view(1, n, h, d).transpose(1, 2) for t in (q, kk, vv))  # [1, H, N, D] views, as HF passes them
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            t_sdpa = c.bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=True))
    except RuntimeError as e:
        print(f"  (SDPA flash unavailable: {str(e).splitlines()[0][:80]})")
        t_sdpa = None
    return t_flash, t_paged, t_sdpa


def decode_inputs(c: Context, batch: int, context: int, h_q: int, h_kv: int, d: int, block_size: int = 16):
    torch = c.torch
    n_blk = -(-context // block_size)
    num_blocks = batch * n_blk
    kc = c.randn(num_blocks, block_size, h_kv, d, dtype=torch.bfloat16)
    vc = c.randn(num_blocks, block_size, h_kv, d, dtype=torch.bfloat16)
    bt = torch.randperm(num_blocks, generator=c.gen, device=c.device).to(torch.int32).view(batch, n_blk)
    q = c.randn(batch, h_q, d, dtype=torch.bfloat16)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=c.device)
    cl = torch.full((batch,), context, dtype=torch.int32, device=c.device)
    return q, kc, vc, cu, cl, bt


def time_decode(c: Context, inputs, **tile) -> float:
    q, kc, vc, cu, cl, bt = inputs
    scale = q.shape[-1] ** -0.5
    return c.bench_ms(lambda: c.paged_mod.paged_attention_triton(
        q, kc, vc, cu, cl, bt, scale=scale, validate=False, **tile))


def copy_bandwidth_gbs(c: Context) -> float:
    """Device-to-device copy: (read + write) bytes / time."""
    n = (1 << 30) // 2 if not c.dry else 1 << 20
    x = c.torch.empty(n, dtype=c.torch.bfloat16, device=c.device)
    y = c.torch.empty_like(x)
    ms = c.bench_ms(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def fits(c: Context, nbytes: int) -> bool:
    if c.device.type != "cuda":
        return True
    free, _ = c.torch.cuda.mem_get_info()
    return nbytes < 0.4 * free


def run_timings(c: Context) -> None:
    torch = c.torch
    h, d = (2, 64) if c.dry else (32, 128)
    seqs = [64] if c.dry else [1024, 2048, 4096, 8192]
    print(f"\n== prefill: bf16, causal, one sequence, H={h}, D={d} (TFLOP/s = 2*2*N^2*H*D/2 / time)")
    print(f"  {'N':>6} {'varlen':>8} {'paged':>8} {'SDPA-fl':>8} {'varlen/SDPA':>12} {'paged/SDPA':>11}  target")
    for n in seqs:
        flops = 2 * 2 * n * n * h * d / 2
        tf, tp, ts = time_prefill(c, n, h, d)
        tflops = [flops / (t * 1e-3) / 1e12 if t else float("nan") for t in (tf, tp, ts)]
        r1 = f"{ts / tf:.2f}x" if ts else "n/a"
        r2 = f"{ts / tp:.2f}x" if ts else "n/a"
        target = ""
        if n == 4096 and ts:
            target = f">= {PREFILL_TARGET}x: {'MET' if min(ts / tf, ts / tp) >= PREFILL_TARGET else 'MISSED'}"
        print(f"  {n:>6} {tflops[0]:>8.1f} {tflops[1]:>8.1f} {tflops[2]:>8.1f} {r1:>12} {r2:>11}  {target}")
        if c.device.type == "cuda":
            torch.cuda.empty_cache()

    h_q, h_kv, d = (4, 2, 64) if c.dry else (32, 8, 128)
    copy_bw = copy_bandwidth_gbs(c)
    print(f"\n== decode: paged_attention, q_len 1, bf16, H_q={h_q}, H_kv={h_kv}, D={d}, block 16")
    print(f"  device copy bandwidth (read+write): {copy_bw:.0f} GB/s; decode GB/s = K+V bytes read / time")
    print(f"  {'batch':>6} {'ctx':>6} {'us':>9} {'GB/s':>8} {'of copy':>8}  target")
    batches = [1, 2] if c.dry else [1, 8, 32, 128]
    contexts = [40] if c.dry else [512, 4096, 16384]
    for b in batches:
        for context in contexts:
            kv_bytes = 2 * b * context * h_kv * d * 2
            if not fits(c, kv_bytes):
                print(f"  {b:>6} {context:>6}  skipped (does not fit)")
                continue
            ms = time_decode(c, decode_inputs(c, b, context, h_q, h_kv, d))
            gbs = kv_bytes / (ms * 1e-3) / 1e9
            frac = gbs / copy_bw
            target = ""
            if context >= 4096 and b >= 32:
                target = f">= {DECODE_TARGET:.0%}: {'MET' if frac >= DECODE_TARGET else 'MISSED'}"
            print(f"  {b:>6} {context:>6} {ms * 1e3:>9.1f} {gbs:>8.0f} {frac:>8.0%}  {target}")
            if c.device.type == "cuda":
                torch.cuda.empty_cache()


def run_sweep(c: Context) -> None:
    n, h, d = (64, 2, 64) if c.dry else (4096, 32, 128)
    print(f"\n== sweep: prefill N={n} (block_m, block_n, warps, stages) -> TFLOP/s varlen / paged")
    flops = 2 * 2 * n * n * h * d / 2
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 8, 4),
                         (128, 128, 8, 2), (64, 128, 4, 2)]:
        try:
            tf, tp, _ = time_prefill(c, n, h, d, block_m=bm, block_n=bn, num_warps=w, num_stages=s)
            print(f"  {(bm, bn, w, s)!s:<20} {flops / tf / 1e9:>7.1f} {flops / tp / 1e9:>7.1f}")
        except Exception as e:  # out of shared memory etc.
            print(f"  {(bm, bn, w, s)!s:<20} failed: {type(e).__name__}: {str(e)[:60]}")
    b, context, h_q, h_kv = (2, 40, 4, 2) if c.dry else (32, 4096, 32, 8)
    print(f"\n== sweep: decode batch {b} ctx {context} (partition, block_n, warps, stages) -> GB/s")
    inputs = decode_inputs(c, b, context, h_q, h_kv, d)
    kv_bytes = 2 * b * context * h_kv * d * 2
    for part, bn, w, s in [(512, 64, 4, 2), (512, 64, 4, 3), (512, 128, 4, 2), (512, 128, 8, 2), (1024, 128, 4, 2),
                           (256, 64, 4, 2), (512, 32, 4, 2)]:
        try:
            ms = time_decode(c, inputs, partition_size=part, decode_block_n=bn, decode_num_warps=w,
                             decode_num_stages=s)
            print(f"  {(part, bn, w, s)!s:<20} {kv_bytes / (ms * 1e-3) / 1e9:>7.0f}")
        except Exception as e:
            print(f"  {(part, bn, w, s)!s:<20} failed: {type(e).__name__}: {str(e)[:60]}")


if __name__ == "__main__":
    sys.exit(main())
