"""Async scheduling (``TurboConfig.async_scheduling``, engine/lookahead.py): the synchronous engine and the one that
queues step N+1 before step N's tokens reach the host, side by side in one run on one model.

Per workload: engine steps, the steps launched ahead (and their share of all steps), the waits (an in-flight step
waited for before the next one was queued: a row that samples on the host, or nothing left to run), the wall
time of each side and their ratio, and whether the tokens are equal. Workloads: an offline batch (``--requests``
prompts of 16-200 tokens, 32-128 new tokens each (``--new-tokens``), greedy and seeded top-p draws, at most
``--max-seqs`` running), arrivals (a new request every ``--every`` steps while the others decode), and the
offline batch with a KV pool of 3 x ``--max-seqs`` blocks (at least 24; a queue waits for blocks all along).

On the CPU the forward runs before the host goes on, so there is nothing to overlap: the time columns there show
only what the bookkeeping and the samplers cost (prefill steps sample with the static sampler on the ahead side,
with ``sample()``'s CPU shortcuts on the other), and the decode steps run through the padded graph path eagerly
(``DecodeGraphs(capture=False)``) on both sides. On CUDA both sides capture CUDA graphs and the ratio is the
overlap's gain.

    python benchmarks/bench_lookahead.py [--shape smollm2-135m] [--layers 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from hf_turbo import Engine, SamplingParams, TurboConfig
from hf_turbo.bench.shapes import build
from hf_turbo.engine.graphs import DecodeGraphs


def _workload(n: int, vocab: int, new: tuple[int, int], seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(256, vocab) for _ in range(rng.randint(16, 200))] for _ in range(n)]
    params = [SamplingParams(max_new_tokens=rng.randint(*new), ignore_eos=True, seed=i,
                             **({} if i % 2 else {"temperature": 0.8, "top_p": 0.9})) for i in range(n)]
    return prompts, params


def _engine(model, device: torch.device, ahead: bool, max_seqs: int, blocks: int | None) -> Engine:
    cuda = device.type == "cuda"
    config = TurboConfig(max_num_seqs=max_seqs, cuda_graphs=cuda, async_scheduling=ahead,
                         backend="triton" if cuda else "reference")
    engine = Engine(model, config=config.replace(enable_prefix_caching=False, num_blocks=blocks))
    if not cuda:
        engine.runner.graphs = DecodeGraphs(engine.runner, max_seqs, engine.pool.num_blocks, capture=False)
    return engine


def _run(engine: Engine, prompts, params, every: int | None) -> tuple[list[list[int]], float]:
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if every is None:
        tokens = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
    else:
        ids, done, step, queued = [], {}, 0, list(zip(prompts, params))
        while queued or engine.has_unfinished():
            if queued and step % every == 0:
                ids.append(engine.add_request(*queued.pop(0)))
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
            step += 1
        tokens = [done[i] for i in ids]
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - t0


def _counters(engine: Engine) -> tuple[int, int, int]:
    """(steps, steps launched ahead, waits) so far."""
    la = engine.lookahead
    return engine.num_steps, 0 if la is None else la.num_ahead, 0 if la is None else la.num_waits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=2, help="fewer layers than the shape's (None: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-seqs", type=int, default=32)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--new-tokens", default="32,128", help="the range of each request's max_new_tokens")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    model, _ = build(args.shape, dtype, device, num_layers=args.layers)
    vocab = model.config.vocab_size
    print(f"{args.shape} ({model.config.num_hidden_layers} layers, vocab {vocab}), {dtype}, {device}")
    print("| workload | steps (sync / ahead) | launched ahead | waits | seconds, sync | seconds, ahead | ahead / sync "
          "| tokens equal |")
    print("|---|---|---|---|---|---|---|---|")
    small = max(3 * args.max_seqs, 24)  # 48 tokens a row (the longest request fits): a queue waits for blocks
    for name, every, blocks in (("offline batch", None, None),
                                (f"arrivals (one per {args.every} steps)", args.every, None),
                                (f"offline batch, {small} KV blocks of 16", None, small)):
        prompts, params = _workload(args.requests, vocab, tuple(map(int, args.new_tokens.split(","))), seed=1)
        results = {}
        for ahead in (False, True):
            engine = _engine(model, device, ahead, args.max_seqs, blocks)
            _run(engine, prompts[:4], params[:4], None)  # warm-up: lean check, captures
            before = _counters(engine)
            tokens, seconds = _run(engine, prompts, params, every)
            results[ahead] = (tokens, seconds, [b - a for a, b in zip(before, _counters(engine))])
            engine.close()
        (sync_tokens, sync_s, (sync_steps, *_)), (tokens, s, (steps, ahead_n, waits)) = \
            results[False], results[True]
        print(f"| {name} | {sync_steps} / {steps} | {ahead_n} ({ahead_n / max(steps, 1):.0%}) | {waits} | "
              f"{sync_s:.2f} | {s:.2f} | {s / sync_s:.2f} | {'yes' if tokens == sync_tokens else 'NO'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
