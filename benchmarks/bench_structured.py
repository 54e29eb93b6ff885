"""The cost of structured output on decode throughput: 32 concurrent JSON-schema requests vs 32 unconstrained
ones on the same Engine, same run, alternated; and how often the sampler waited for the grammar masks.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_structured.py --model fixture
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_structured.py --shape smollm2-135m --shape-layers 8

Decode throughput is timed over full steps only: every request of the batch running and decoding one token
(no prefill, no request finished yet), tokens per second = batch / step time, median over those steps.
A ``--shape`` model has random weights and no tokenizer: its grammar runs over a stand-in vocabulary of the
shape's size (the 256 bytes, then printable strings of 2-8 characters), so the masks cost what a real
vocabulary of that size costs; the fixture runs with its own tokenizer.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import time

import torch

import hf_turbo
from hf_turbo.sampling import SamplingParams

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "minLength": 40, "maxLength": 60},
    "summary": {"type": "string", "minLength": 60, "maxLength": 80},
    "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 3, "maxItems": 5},
    "rating": {"enum": ["low", "mid", "high"]}},
    "required": ["title", "summary", "year", "tags", "rating"], "additionalProperties": False}


def stand_in_vocab(size: int, seed: int = 0) -> list[bytes]:
    """``size`` distinct tokens: the 256 single bytes, then printable strings of 2-8 characters."""
    rng = random.Random(seed)
    vocab, seen = [bytes([b]) for b in range(256)], set()
    alphabet = string.ascii_letters + string.digits + ' _-.,:"{}[]'
    while len(vocab) < size:
        piece = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8))).encode()
        if piece not in seen:
            seen.add(piece)
            vocab.append(piece)
    return vocab


def load(args):
    """``(model, tokenizer or None, compiled grammar)``."""
    import xgrammar as xgr

    if args.shape:
        from hf_turbo.bench.shapes import build

        model, _ = build(args.shape, torch.float32, torch.device("cpu"), num_layers=args.shape_layers)
        vocab = model.config.vocab_size
        info = xgr.TokenizerInfo(stand_in_vocab(vocab), xgr.VocabType.RAW, vocab_size=vocab, stop_token_ids=[0])
        model.generation_config.eos_token_id = 0
        return model, None, xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    from hf_turbo.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model, device="cpu")
    return model, tok, None


def run(eng, prompts, params) -> tuple[list[float], int]:
    """Step a batch to the end; the times of its full decode steps and the tokens it generated."""
    ids = [eng.add_request(p, s) for p, s in zip(prompts, params)]
    reqs = [eng.requests[i] for i in ids]
    times, tokens = [], 0
    while eng.has_unfinished():
        full = all(r.num_computed == r.num_tokens - 1 and r.finish_reason is None for r in reqs) \
            and len(eng.scheduler.running) == len(reqs)
        t0 = time.perf_counter()
        outs = eng.step()
        if full:
            times.append(time.perf_counter() - t0)
        tokens += sum(1 for _ in outs)
    return times, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fixture")
    parser.add_argument("--shape", default=None, help="a shipped bench shape (random weights), e.g. smollm2-135m")
    parser.add_argument("--shape-layers", type=int, default=None)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2, help="alternated rounds of each kind")
    args = parser.parse_args()
    model, tok, compiled = load(args)
    eng = hf_turbo.Engine(model, tok, max_num_seqs=args.requests, num_blocks=4096)
    grammar = {"grammar": compiled} if compiled is not None else {"json_schema": SCHEMA}
    vocab = eng.vocab_size
    prompts = [[300 + (7 * i + j) % (vocab - 300) for j in range(24)] for i in range(args.requests)]
    kinds = {
        "unconstrained": [SamplingParams(max_new_tokens=args.max_tokens, temperature=1.0, seed=i, ignore_eos=True)
                          for i in range(args.requests)],
        "json_schema": [SamplingParams(max_new_tokens=args.max_tokens, temperature=1.0, seed=i, **grammar)
                        for i in range(args.requests)],
    }
    run(eng, prompts[:4], kinds["json_schema"][:4])  # warm-up: compile, first steps
    steps = {k: [] for k in kinds}
    waits = {"steps": 0, "waits": 0, "wait_s": 0.0}
    for _ in range(args.rounds):
        for kind, params in kinds.items():
            before = eng.stats()
            times, _ = run(eng, prompts, params)
            steps[kind] += times
            after = eng.stats()
            if kind == "json_schema":
                waits["steps"] += after["grammar_mask_steps"] - before["grammar_mask_steps"]
                waits["waits"] += after["grammar_mask_waits"] - before["grammar_mask_waits"]
                waits["wait_s"] += after["grammar_mask_wait_s"] - before["grammar_mask_wait_s"]
    eng.check_invariants()
    name = f"{args.shape} ({args.shape_layers or 'all'} layers, vocab {vocab})" if args.shape else args.model
    print(f"model {name}, {args.requests} concurrent requests, torch threads {torch.get_num_threads()}")
    print(f"{'kind':<14} {'full steps':>10} {'median step ms':>15} {'decode tok/s':>13}")
    rate = {}
    for kind, times in steps.items():
        med = statistics.median(times)
        rate[kind] = args.requests / med
        print(f"{kind:<14} {len(times):>10} {med * 1e3:>15.2f} {rate[kind]:>13.1f}")
    print(f"json_schema / unconstrained decode tok/s: {rate['json_schema'] / rate['unconstrained']:.3f}")
    print(f"sampler waited for the masks at {waits['waits']} of {waits['steps']} constrained steps "
          f"({waits['wait_s'] * 1e3:.1f} ms in all)")
    eng.close()


if __name__ == "__main__":
    main()
