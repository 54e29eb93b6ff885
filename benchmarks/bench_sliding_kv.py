"""Sliding-window release (issue 23, item 3): KV bytes a long sequence holds, and sequences a fixed KV budget
runs at once, with and without ``CacheConfig.sliding_release``, in the same run.

Random-weight models with the layer pattern of real families (gemma2 1:1, gemma3 5:1 sliding:full, mistral v0.1
all sliding) at a small width, the window and context scaled together so that context / window matches the real
model at its long context (gemma-2-9b: 4096 of 8192; gemma-3-12b: 1024 of 32768; mistral-7b-v0.1: 4096 of 32768).
Each case prefills 4 sequences of ``context`` tokens and decodes 8 more, then reads the held blocks from the
engine; the capacity columns are what a 16 MiB KV budget gives: engine blocks, and sequences of the model's
full length (its context here) running at once. Nothing is downloaded.

    python benchmarks/bench_sliding_kv.py [--scale 32]
"""

from __future__ import annotations

import argparse
import math

import torch

import hf_turbo
from hf_turbo import Engine, SamplingParams
from hf_turbo.testing import tiny_model

# family, layers, real window, real context, what it stands for
CASES = [("gemma2", 4, 4096, 8192, "gemma-2-9b @ 8k"), ("gemma3_text", 6, 1024, 32768, "gemma-3-12b @ 32k"),
         ("mistral", 4, 4096, 32768, "mistral-7b-v0.1 @ 32k")]
BS = 16
SEQS = 4
BUDGET = 16 << 20


def measure(family: str, layers: int, window: int, context: int, release: bool) -> tuple[int, int, int]:
    """(KV bytes held by SEQS sequences at ``context`` tokens, engine blocks, sequences of ``context`` the
    budget runs at once)."""
    model = tiny_model(family, num_hidden_layers=layers, sliding_window=window, max_position_embeddings=context)
    cfg = hf_turbo.TurboConfig().replace(block_size=BS, backend="reference", max_num_seqs=256,
                                         max_num_batched_tokens=2048, sliding_release=release,
                                         cpu_kv_bytes=BUDGET)
    engine = Engine(model, config=cfg)
    cache = engine.cache
    prompts = [[(7 * s + i) % 500 + 3 for i in range(context - 8)] for s in range(SEQS)]
    for p in prompts:
        engine.add_request(p, SamplingParams(max_new_tokens=8, ignore_eos=True))
    held = 0
    while engine.has_unfinished():
        engine.step()
        running = [r for r in engine.scheduler.running if r.num_computed > r.num_prompt_tokens]  # decoding
        if len(running) == SEQS:
            held = max(held, _bytes(cache, running))
    per_seq = math.ceil(context / BS)
    sliding = cache.sliding
    seqs = engine.pool.num_blocks // per_seq
    if sliding is not None:
        seqs = min(seqs, sliding.max_running)
    return held, engine.pool.num_blocks, seqs


def _bytes(cache, running) -> int:
    total = 0
    for i in range(cache.num_layers):
        k = cache.layer_pools(i)[0]
        per_block = 2 * k[0].numel() * k.element_size()
        if cache.sliding is not None and i in cache.sliding.layers:
            total += per_block * sum(cache.sliding.held(r) for r in running)
        else:
            total += per_block * sum(len(r.block_ids) for r in running)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, default=32, help="real window and context divided by this")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"| stands for | window / context (scaled 1/{args.scale}) | KV held, kept (MiB) | KV held, released (MiB) "
          f"| less | blocks at {BUDGET >> 20} MiB, kept / released | sequences at once, kept / released |")
    print("|---|---|---|---|---|---|---|")
    for family, layers, window, context, name in CASES:
        w, c = window // args.scale, context // args.scale
        kept = measure(family, layers, w, c, False)
        rel = measure(family, layers, w, c, True)
        print(f"| {name} ({family}, {layers} layers) | {w} / {c} | {kept[0] / 2**20:.2f} | {rel[0] / 2**20:.2f} | "
              f"{kept[0] / rel[0]:.2f}x | {kept[1]} / {rel[1]} | {kept[2]} / {rel[2]} |")


if __name__ == "__main__":
    main()
