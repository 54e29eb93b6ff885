"""The GPU benchmark a user would run: random-weight real shapes, stock vs transformers' CB vs hf_turbo, one table.

    python benchmarks/gpu_e2e.py                      # llama3.1-8b and llama3.2-1b in bf16 on CUDA
    python benchmarks/gpu_e2e.py --device cpu --dtype float32 --shapes smollm2-135m --layers 1 --quick

Per shape (``hf_turbo/bench/shapes``, no download): decode tok/s at each batch size with a ``--context``-token
prompt per row, measured as (B x N) / (t(1 + N new tokens) - t(1 new token)) so prefill cancels out, and an
offline run of ``--requests`` requests. Paths, in one run on one model: stock ``generate()`` on padded
batches, transformers' continuous batching (``generate_batch``'s manager; its CUDA graphs asked for where
its config has ``use_cuda_graph``), and hf_turbo's Engine with CUDA graphs on (with async scheduling, its
default there; ``turbo_graphs_sync`` without it, decode rows only) and off. Each decode row has
its share of the memory roofline: B / ((weight bytes + KV bytes read per step) / measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import inspect
import random
import sys
import time

import torch

from hf_turbo import Engine, SamplingParams, TurboConfig
from hf_turbo.bench import paths as bench_paths
from hf_turbo.bench.ceilings import machine_info, measure_ceilings
from hf_turbo.bench.shapes import build
from hf_turbo.bench.workloads import Workload
from hf_turbo.cache.paged_cache import kv_layout

PATH_NAMES = ("stock", "hf_cb", "turbo_graphs", "turbo_graphs_sync", "turbo_eager")


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256, vocab) for _ in range(length)] for _ in range(n)]


@contextlib.contextmanager
def _cb_graphs(device: torch.device):
    """Ask transformers' continuous batching for its CUDA graphs where its config has the switch."""
    original = bench_paths._cb_config
    try:
        from transformers import ContinuousBatchingConfig
        has = "use_cuda_graph" in inspect.signature(ContinuousBatchingConfig).parameters
    except ImportError:
        has = False
    if device.type == "cuda" and has:
        def config(ctx, workload):
            cb = original(ctx, workload)
            cb.use_cuda_graph = True
            return cb
        bench_paths._cb_config = config
    try:
        yield "graphs on" if device.type == "cuda" and has else "its defaults"
    finally:
        bench_paths._cb_config = original


def _run_hf(path: str, ctx, prompts: list[list[int]], new: int) -> float:
    workload = Workload("e2e", "gpu_e2e", tuple(map(tuple, prompts)), (new,) * len(prompts))
    fn = bench_paths.hf_padded if path == "stock" else bench_paths.hf_cb
    return fn(dataclasses.replace(ctx, max_batch=len(prompts)), workload).seconds


def _run_turbo(engine: Engine, prompts: list[list[int]], new, device) -> float:
    news = new if isinstance(new, list) else [new] * len(prompts)
    params = [SamplingParams(max_new_tokens=n, min_new_tokens=n) for n in news]
    _sync(device)
    start = time.perf_counter()
    engine.generate(prompts, params, use_tqdm=False)
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _roofline_share(model, batch: int, context: float, tok_s: float, gbps: float) -> float:
    elem = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    layers, kv_heads, head_dim = kv_layout(model.config)
    kv = batch * context * 2 * layers * kv_heads * head_dim
    floor_s = (weights + kv) * elem / (gbps * 1e9)
    return tok_s / (batch / floor_s)


def _offline_row(name: str, label: str, path: str, engine, ctx, offline, offline_new, args, device) -> tuple:
    try:
        if engine is None:
            workload = Workload("offline", "gpu_e2e", tuple(map(tuple, offline)), tuple(offline_new))
            fn = bench_paths.hf_padded if path == "stock" else bench_paths.hf_cb
            seconds = fn(dataclasses.replace(ctx, max_batch=max(args.batches)), workload).seconds
        else:
            seconds = _run_turbo(engine, offline, offline_new, device)
        return name, label, f"offline {len(offline)} req", sum(offline_new) / seconds, None, ""
    except bench_paths.PathUnavailable as exc:
        return name, label, f"offline {len(offline)} req", None, None, str(exc)


def bench_shape(name: str, args, device: torch.device, dtype: torch.dtype, gbps: float) -> list[tuple]:
    model, words = build(name, dtype, device, num_layers=args.layers)
    vocab = model.config.vocab_size
    ctx = bench_paths.BenchContext(model, words, device, dtype, progress=False)
    n_new = args.new_tokens
    rows = []
    rng = random.Random(1)
    offline = _prompts(args.requests, 1, vocab, 7)
    offline = [p * rng.randint(args.context // 8, args.context // 2) for p in offline]  # varied lengths
    offline_new = [rng.randint(n_new, 4 * n_new) for _ in offline]
    max_len = args.context + 4 * n_new + 8
    for path in PATH_NAMES:
        engine = None
        if path.startswith("turbo"):
            graphs = path.startswith("turbo_graphs") and device.type == "cuda"
            config = TurboConfig(max_num_seqs=max(args.batches), max_model_len=max_len, cuda_graphs=graphs,
                                 async_scheduling=False if path == "turbo_graphs_sync" else None)
            engine = Engine(model, config=config.replace(enable_prefix_caching=False))
        with _cb_graphs(device) as cb_note:
            label = f"hf_cb ({cb_note})" if path == "hf_cb" else path
            if path.startswith("turbo_graphs") and device.type != "cuda":
                label += " (no CUDA: eager)"
            for batch in args.batches:
                prompts = _prompts(batch, args.context, vocab, seed=batch)
                try:
                    if engine is None:
                        _run_hf(path, ctx, prompts, 2)  # warm-up
                        t1 = _run_hf(path, ctx, _prompts(batch, args.context, vocab, 100 + batch), 1)
                        tn = _run_hf(path, ctx, _prompts(batch, args.context, vocab, 200 + batch), 1 + n_new)
                    else:
                        _run_turbo(engine, prompts, 1 + n_new, device)  # warm-up: compiles, captures
                        t1 = _run_turbo(engine, _prompts(batch, args.context, vocab, 100 + batch), 1, device)
                        tn = _run_turbo(engine, _prompts(batch, args.context, vocab, 200 + batch), 1 + n_new,
                                        device)
                except bench_paths.PathUnavailable as exc:
                    rows.append((name, label, f"decode B={batch}", None, None, str(exc)))
                    continue
                tok_s = batch * n_new / max(tn - t1, 1e-9)
                share = _roofline_share(model, batch, args.context + n_new / 2, tok_s, gbps)
                rows.append((name, label, f"decode B={batch}", tok_s, share, ""))
            if path != "turbo_graphs_sync":  # the async-scheduling comparison has its decode rows only
                rows.append(_offline_row(name, label, path, engine, ctx, offline, offline_new, args, device))
        if engine is not None:
            engine.close()
            del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del model
    gc.collect()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--shapes", default="llama3.1-8b,llama3.2-1b")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (tests)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script itself")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.quick:
        args.context, args.batches, args.new_tokens, args.requests = 24, [1, 2], 3, 6
    else:
        args.context, args.batches, args.new_tokens, args.requests = 1024, [1, 16, 64], 32, 256
    info = machine_info(device, dtype)
    card = info.get("gpu") or info["cpu_model"]
    gbps = measure_ceilings(device, dtype, quick=True).memcpy_gbps
    rows = []
    for name in args.shapes.split(","):
        rows += bench_shape(name, args, device, dtype, gbps)
    print(f"\n{card} | {args.dtype} | torch {info['torch']} | transformers {info['transformers']} | copy "
          f"{gbps:.0f} GB/s | context {args.context}, {args.new_tokens} decode tokens timed")
    print("| shape | path | run | tok/s | roofline |")
    print("|---|---|---|---:|---:|")
    for shape, label, run, tok_s, share, note in rows:
        speed = "n/a" if tok_s is None else f"{tok_s:,.0f}"
        roof = "" if share is None else f"{100 * share:.0f}%"
        print(f"| {shape} | {label} | {run} | {speed} | {roof}{' ' + note if note else ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
