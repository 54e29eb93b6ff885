"""Run by tests/test_tensor_parallel.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): not a test module.

``python _tp_worker.py OUT_DIR MODEL_DIR...``: for each saved tiny model, every rank loads it with
``tp_plan="auto"``; rank 0 drives an Engine (greedy prompts, seeded and unseeded sampling, an abort in the
middle of a run, an AsyncEngine stream cancelled after its first delta) and the other ranks follow. Rank 0
writes ``OUT_DIR/<name>.json`` with its outputs; every rank writes ``OUT_DIR/<name>.rank<r>.json`` with its
pool shape and its follower counts.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from hf_turbo import Engine, SamplingParams, accelerate, restore
from hf_turbo.config import SpeculativeConfig
from hf_turbo.engine import AsyncEngine

NEW = 10
N2 = SamplingParams(max_new_tokens=NEW, n=2, temperature=0.8, seed=7)


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 7, 12, 21, 33, 5)]


def fresh_prompts(vocab: int) -> list[list[int]]:
    """Prompts no earlier run has put in the prefix cache."""
    return [list(reversed(p)) for p in prompts(vocab)[2:5]]


async def cancelled_stream(engine: AsyncEngine, prompt: list[int]) -> list[int]:
    """A stream dropped after its first delta (an abort while the engine thread steps), then a full one."""
    async for _ in engine.generate(prompt, SamplingParams(max_new_tokens=50)):
        break
    out = None
    async for delta in engine.generate(prompt, SamplingParams(max_new_tokens=NEW)):
        out = delta
    return out.output.token_ids


def drive(engine: Engine, vocab: int) -> dict:
    ps = prompts(vocab)
    out = {"greedy": [o.token_ids for o in engine.generate(ps, SamplingParams(max_new_tokens=NEW), use_tqdm=False)]}
    seeded = [SamplingParams(max_new_tokens=NEW, temperature=0.9, top_k=20, seed=100 + i) for i in range(len(ps))]
    out["seeded"] = [o.token_ids for o in engine.generate(ps, seeded, use_tqdm=False)]
    out["unseeded"] = [o.token_ids for o in engine.generate(ps, SamplingParams(max_new_tokens=NEW, temperature=1.0),
                                                            use_tqdm=False)]
    # n samples of one prompt share its blocks: the second copies the prompt's last partial block (copy-on-write)
    out["n2"] = [o.token_ids for o in engine.generate(fresh_prompts(vocab), N2, use_tqdm=False)]
    out["n2_copies"] = engine.runner.num_copies
    # an abort in the middle of a run: one request loses its blocks while the others keep stepping
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=NEW)) for p in ps[:3]]
    engine.step()
    engine.step()
    engine.abort(ids[1])
    out["after_abort"] = [o.token_ids for o in engine.run_to_completion([ids[0], ids[2]])]

    # a run interrupted by an error on rank 0 between two steps: its requests are aborted, the group goes on
    def boom(o):
        raise KeyboardInterrupt("interrupt on rank 0")

    ids = [engine.add_request(p, SamplingParams(max_new_tokens=NEW)) for p in ps[:2]]
    try:
        engine.run_to_completion(ids, boom)
    except KeyboardInterrupt:
        out["interrupted"] = True
    out["last"] = engine.generate(ps[-1], SamplingParams(max_new_tokens=NEW), use_tqdm=False)[0].token_ids
    return out


async def drive_async(engine: AsyncEngine, vocab: int) -> list[int]:
    async with engine:
        return await cancelled_stream(engine, prompts(vocab)[2])


def symmetric(model, vocab: int) -> dict:
    """The same calls on every rank (a plain script under torchrun): Engine.generate and accelerate()d generate()
    return rank 0's outputs everywhere; close() and restore() end the group on every rank."""
    engine = Engine(model, None)
    ps = prompts(vocab)
    out = {"symmetric": [o.token_ids for o in engine.generate(ps, SamplingParams(max_new_tokens=NEW), use_tqdm=False)]}
    engine.close()
    accelerate(model)
    try:
        ids = torch.tensor([ps[2], ps[2]])
        out["generate"] = model.generate(ids, max_new_tokens=NEW, do_sample=False)[:, len(ps[2]):].tolist()
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out["generate"] = f"{type(exc).__name__}: {exc}"
    restore(model)
    return out


def main() -> None:
    out_dir, paths = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for path in paths:
        name = os.path.basename(path)
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32)
        vocab = model.config.vocab_size
        engine = AsyncEngine(model, None, debug_checks=True, max_num_batched_tokens=64)
        sync = engine.engine
        info = {"pool_heads": sync.cache.key_pools[0].shape[2], "num_blocks": sync.pool.num_blocks}
        if rank == 0:
            result = drive(sync, vocab)
            result["async"] = asyncio.run(drive_async(engine, vocab))
            sync.close()
            with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
                json.dump(result, f)
        else:
            try:
                sync.add_request([1, 2, 3])
                sync.step()
            except RuntimeError as exc:
                info["refused"] = str(exc)
            sync.abort("req-0")
            sync.follow()
            info.update(sync.tp.stats.__dict__)
        info["pool_heads_after"] = sync.cache.key_pools[0].shape[2]
        # n-gram speculation: rank 0 alone proposes and picks k; its proposals travel in the plans
        spec = Engine(model, None, debug_checks=True, speculative=SpeculativeConfig(method="ngram", num_tokens=3))
        if rank == 0:
            repetitive = [p * 3 for p in prompts(vocab)[:4]]
            outs = spec.generate(repetitive, SamplingParams(max_new_tokens=NEW), use_tqdm=False)
            stats = spec.stats()
            spec.close()
            plain = Engine(model, None)
            ref = plain.generate(repetitive, SamplingParams(max_new_tokens=NEW), use_tqdm=False)
            plain.close()
            info["spec_equal"] = [o.token_ids for o in outs] == [o.token_ids for o in ref]
            info["spec_proposed"] = {k: v for k, v in stats.items() if "spec" in k or "accept" in k or "propos" in k}
        else:
            spec.follow()
            plain = Engine(model, None)
            plain.follow()
            info["spec_follower"] = spec.tp.stats.__dict__
        info.update(symmetric(model, vocab))
        with open(os.path.join(out_dir, f"{name}.rank{rank}.json"), "w") as f:
            json.dump(info, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
