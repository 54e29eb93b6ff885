"""Speculation through generate() at batch 1: four prompts one after another, fixture pair, same run.

    python benchmarks/bench_spec_generate.py --threads 1 [--rounds 5] [--new 48]

Paths, interleaved round robin: the accelerated ``generate()`` without speculation, with
``assistant_model=draft`` and with ``prompt_lookup_num_tokens=5``. Each round calls ``generate()`` once
per prompt (batch 1, greedy) and times the four calls together; the table gives the fastest round and
the median, each path's ratio to plain, its tokens per target step and whether its tokens equal plain's.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_turbo
from hf_turbo.bench.workloads import corpus_token_ids
from hf_turbo.testing import fixture_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new", type=int, default=48, help="new tokens per call")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per call")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process's CPU seconds (a fairer A/B while other processes load the box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    tok = AutoTokenizer.from_pretrained(fixture_path("target"))
    model = AutoModelForCausalLM.from_pretrained(fixture_path("target"))
    draft = AutoModelForCausalLM.from_pretrained(fixture_path("draft"))
    corpus = corpus_token_ids(tok)
    rng = random.Random(0)
    prompts = []
    for _ in range(4):
        start = rng.randrange(0, len(corpus) - args.prompt)
        prompts.append(torch.tensor([corpus[start:start + args.prompt]]))
    hf_turbo.accelerate(model)
    paths = {"plain": {}, "draft": {"assistant_model": draft}, "ngram": {"prompt_lookup_num_tokens": 5}}
    times: dict[str, list[float]] = {p: [] for p in paths}
    outs: dict[str, list] = {}
    for name, kw in paths.items():  # warm-up: engines built, extension loaded, lean checks done
        outs[name] = [model.generate(p, max_new_tokens=args.new, do_sample=False, **kw) for p in prompts]
    for _ in range(args.rounds):
        for name, kw in paths.items():
            t0 = clock()
            for p in prompts:
                model.generate(p, max_new_tokens=args.new, do_sample=False, **kw)
            times[name].append(clock() - t0)
    base = min(times["plain"])
    print(f"{'path':8s} {'best s':>8s} {'median s':>9s} {'x plain':>8s} {'x plain (median)':>17s} {'same tokens':>12s}")
    for name in paths:
        same = all(torch.equal(a, b) for a, b in zip(outs[name], outs["plain"]))
        print(f"{name:8s} {min(times[name]):8.3f} {statistics.median(times[name]):9.3f} "
              f"{base / min(times[name]):8.2f} "
              f"{statistics.median(times['plain']) / statistics.median(times[name]):17.2f} {str(same):>12s}")
    for name in paths:
        if name != "plain":
            engine = next(e for k, e in model._hf_turbo.extras["spec_engines"].items() if k[0] == name)
            print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in engine.stats().items()
                         if k.startswith("spec") or k in ("steps", "generated_tokens", "acceptance_rate")})


if __name__ == "__main__":
    main()
