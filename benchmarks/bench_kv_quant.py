"""8-bit KV cache: what it buys (sequences per KV byte budget), what it costs (decode speed, accuracy).

    .venv/bin/python benchmarks/bench_kv_quant.py                  # capacity + decode, smollm2-135m shape, 4 layers
    .venv/bin/python benchmarks/bench_kv_quant.py --parts scales   # per-(token, head) vs per-(block, head) scales

* ``capacity``: engines built at one ``cpu_kv_bytes`` budget for a float32 model (float32 and 8-bit caches) and a
  bfloat16 model (bf16 and 8-bit caches): KV blocks, the sequences of ``--seq-len`` tokens they hold, and the
  peak number of sequences an engine really ran at once on ``2 x`` that many requests (admitted in one step).
* ``decode``: decode tokens per second of one batch, the float32 cache (CPU backend and reference backend)
  against the 8-bit caches (reference backend), alternated in one process, best of ``--repeats``.
* ``scales``: teacher-forced per-token log-likelihoods on the trained fixture with each 8-bit scheme, scales per
  (token, head) as shipped against per (block, head) (each block quantized once, whole: the best case for
  per-block), as |delta| against the float32 cache; and the bytes each layout takes.
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
from unittest import mock

import torch

import hf_turbo
from hf_turbo import Engine, SamplingParams, TurboConfig
from hf_turbo.backends import ReferenceBackend
from hf_turbo.backends.kv_quant import KV_QUANT
from hf_turbo.bench.shapes import build as build_shape

KV8 = tuple(KV_QUANT)


def _engine(model, kv_dtype: str, budget: int | None = None, backend: str = "auto", **over) -> Engine:
    cfg = TurboConfig(backend=backend).replace(kv_dtype=kv_dtype, **over)
    if budget is not None:
        cfg = cfg.replace(cpu_kv_bytes=budget)
    return Engine(model, None, cfg)


def capacity(args) -> None:
    print(f"\n## capacity: {args.shape} ({args.layers} layers), KV budget {args.budget_mib} MiB, "
          f"sequences of {args.seq_len} tokens (block size 16)")
    print("| model dtype | KV cache | KV blocks | x float blocks | sequences that fit | x float | peak running "
          "(measured) |")
    print("|---|---|---|---|---|---|---|")
    budget = args.budget_mib << 20
    per_seq = math.ceil(args.seq_len / 16)
    for mdtype in (torch.float32, torch.bfloat16):
        model, _ = build_shape(args.shape, mdtype, torch.device("cpu"), args.layers)
        base = base_blocks = None
        for kv in ("auto", *KV8):
            # a step budget that admits every request at once: the pool, not the prefill rate, limits the batch
            eng = _engine(model, kv, budget, max_num_seqs=1024, max_num_batched_tokens=1 << 17)
            blocks = eng.pool.num_blocks
            fit = blocks // per_seq
            base, base_blocks = base or fit, base_blocks or blocks
            peak = _peak_running(eng, 2 * fit, args.seq_len, model.config.vocab_size) if args.run else "-"
            name = str(mdtype).replace("torch.", "") if kv == "auto" else kv
            print(f"| {str(mdtype).replace('torch.', '')} | {name} | {blocks} | {blocks / base_blocks:.2f} | {fit} | "
                  f"{fit / base:.2f} | {peak} |", flush=True)
            hf_turbo.restore(model)


def _peak_running(eng: Engine, n: int, seq_len: int, vocab: int) -> int:
    g = torch.Generator().manual_seed(0)
    new = 4
    params = SamplingParams(max_new_tokens=new, min_new_tokens=new)
    for _ in range(n):
        eng.add_request(torch.randint(256, vocab, (seq_len - new,), generator=g).tolist(), params)
    peak = 0
    while eng.has_unfinished():
        eng.step()
        peak = max(peak, len(eng.scheduler.running))
    return peak


def decode(args) -> None:
    model, _ = build_shape(args.shape, torch.float32, torch.device("cpu"), args.layers)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(256, model.config.vocab_size, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.batch)]
    variants = [("float32 cache, cpu backend", "auto", "auto"), ("float32 cache, reference backend", "auto",
                                                                   "reference")]
    variants += [(f"{kv} cache, reference backend", kv, "auto") for kv in KV8]
    engines = {name: _engine(model, kv, backend=be, num_blocks=args.batch * 64) for name, kv, be in variants}
    best = {name: math.inf for name in engines}
    for _ in range(args.repeats):
        for name, eng in engines.items():  # alternated: the box's noise hits every variant alike
            best[name] = min(best[name], _decode_seconds(eng, prompts, args.new_tokens))
    print(f"\n## decode: {args.shape} ({args.layers} layers, float32 weights), batch {args.batch}, prompts "
          f"{args.prompt_len} tokens, {args.new_tokens} decode steps, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}")
    print("| KV cache | decode tokens/s | x float32 cache (cpu backend) |")
    print("|---|---|---|")
    ref = best[variants[0][0]]
    for name, secs in best.items():
        print(f"| {name} | {args.batch * args.new_tokens / secs:.1f} | {ref / secs:.2f} |")
    hf_turbo.restore(model)


def _decode_seconds(eng: Engine, prompts, new_tokens: int) -> float:
    """Seconds of the decode steps only (the prefill step is not timed)."""
    params = SamplingParams(max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1)
    for p in prompts:
        eng.add_request(p, params)
    eng.step()  # the prefill (the step budget holds every prompt)
    start = time.perf_counter()
    while eng.has_unfinished():
        eng.step()
    return time.perf_counter() - start


class _PerBlockBackend(ReferenceBackend):
    """Scales per (block, head) over the tokens a write puts in each block (a whole prompt in one forward: each
    block quantized once, whole), stored per slot so the reference's attention reads them unchanged."""

    def write_kv(self, ctx, layer, key, value) -> None:
        cache = ctx.cache
        dtype, qmax = KV_QUANT[cache.kv_dtype]
        slots = ctx.slot_mapping
        uniq, inv = torch.unique(slots // cache.block_size, return_inverse=True)
        for pool, scales, src in zip(cache.layer_pools(layer), cache.layer_scales(layer), (key, value)):
            x = src.float()
            amax = torch.zeros(len(uniq), x.shape[1]).index_reduce_(0, inv, x.abs().amax(-1), "amax")
            scale = (torch.where(amax > 0, amax, qmax) / qmax)[inv]  # [T, H]
            y = x / scale[..., None]
            q = y.round().clamp(-qmax, qmax).to(dtype) if dtype == torch.int8 else y.clamp(-qmax, qmax).to(dtype)
            pool.view(torch.uint8).view(-1, *pool.shape[2:]).index_copy_(0, slots, q.view(torch.uint8))
            scales.view(-1, scales.shape[2]).index_copy_(0, slots, scale)


def scales(args) -> None:
    import textwrap

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_turbo.eval.runner import turbo_logprobs
    from hf_turbo.testing import fixture_path

    model = AutoModelForCausalLM.from_pretrained(fixture_path("target"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(fixture_path("target"))
    ids = tok(inspect.getsource(textwrap) + inspect.getsource(argparse))["input_ids"]
    seqs = [ids[i * args.tf_len:(i + 1) * args.tf_len] for i in range(args.tf_seqs)]
    cfg = TurboConfig().replace(block_size=16)
    base = turbo_logprobs(model, tok, seqs, cfg)
    head_dim = model.config.head_dim
    print(f"\n## scales: the fixture (float32, head_dim {head_dim}), teacher-forced, {args.tf_seqs} x {args.tf_len} "
          "tokens, block size 16; |delta log p| per token against the float32 cache")
    print("| kv_dtype | scales per | mean abs delta | max abs delta | bytes per token and head | x float32 |")
    print("|---|---|---|---|---|---|")
    for kv in KV8:
        for layout in ("(token, head)", "(block, head)"):
            if layout == "(block, head)":
                with mock.patch("hf_turbo.engine.engine.get_backend", lambda *a, **k: _PerBlockBackend()):
                    got = turbo_logprobs(model, tok, seqs, cfg.replace(kv_dtype=kv))
                per = head_dim + 4 / 16
            else:
                got = turbo_logprobs(model, tok, seqs, cfg.replace(kv_dtype=kv))
                per = head_dim + 4
            d = torch.tensor([abs(a - b) for x, y in zip(base, got) for a, b in zip(x, y)])
            print(f"| {kv} | {layout} | {d.mean():.2e} | {d.max():.2e} | {per:g} | {4 * head_dim / per:.2f} |",
                  flush=True)
    hf_turbo.restore(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="capacity,decode", help="capacity, decode, scales (comma-separated)")
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the shape (default 4)")
    parser.add_argument("--budget-mib", type=int, default=16, help="KV byte budget of the capacity part (MiB)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence in the capacity part")
    parser.add_argument("--no-run", dest="run", action="store_false", help="capacity: skip the measured peak")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tf-seqs", type=int, default=8)
    parser.add_argument("--tf-len", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = {"capacity": capacity, "decode": decode, "scales": scales}
    for part in args.parts.split(","):
        parts[part](args)


if __name__ == "__main__":
    main()
