"""The sampler alone against stock transformers' processors + ``multinomial``, on the same logits, same run.

``python -m hf_turbo.bench.sampler_bench [--batch 64] [--vocab 151936] [--threads 1] [--device cpu]``
prints one row per configuration: hf_turbo's ``sample`` and the stock path (the processor list
``generate()`` builds for those settings, then ``softmax`` + ``multinomial``, as its sampling loop
does), each the fastest of ``--repeats`` runs. Logits are Gaussian with the standard deviation of a
trained model's (``shapes.LOGIT_STD``, the trained fixture's 4.5); penalty rows carry a 512-token
history per row. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from hf_turbo.bench.shapes import LOGIT_STD
from hf_turbo.sampling import RowState, SamplingParams, sample

__all__ = ["CONFIGS", "main", "run"]

# name -> SamplingParams fields (the stock side uses transformers' processors for the same settings)
CONFIGS: dict[str, dict] = {
    "T=0.8 top_p=0.95": dict(temperature=0.8, top_p=0.95),
    "T=0.8 top_k=50": dict(temperature=0.8, top_k=50),
    "T=0.8 min_p=0.05": dict(temperature=0.8, min_p=0.05),
    "T=0.8 repetition_penalty=1.1": dict(temperature=0.8, repetition_penalty=1.1),
    "T=1.0 (OpenAI default)": dict(temperature=1.0),
    "greedy": dict(temperature=0.0),
}


def _stock(kw: dict) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if kw.get("repetition_penalty", 1.0) != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]))
    if kw["temperature"] == 0.0:
        return lambda ids, logits: procs(ids, logits).argmax(dim=-1)
    if kw["temperature"] != 1.0:
        procs.append(TemperatureLogitsWarper(kw["temperature"]))
    if kw.get("top_k"):
        procs.append(TopKLogitsWarper(kw["top_k"]))
    if kw.get("top_p", 1.0) < 1.0:
        procs.append(TopPLogitsWarper(kw["top_p"]))
    if kw.get("min_p"):
        procs.append(MinPLogitsWarper(kw["min_p"]))
    return lambda ids, logits: torch.multinomial(procs(ids, logits).softmax(dim=-1), 1)


def _fastest(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up (and the sampler's scratch buffers)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def run(batch: int = 64, vocab: int = 151_936, device: str = "cpu", repeats: int = 3,
        seed: int = 0) -> list[dict]:
    """One record per configuration: milliseconds for hf_turbo and stock, and their ratio."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, vocab, generator=g) * LOGIT_STD).to(dev)
    history = torch.randint(0, vocab, (batch, 512), generator=g)
    records = []
    for name, kw in CONFIGS.items():
        params = SamplingParams(max_new_tokens=1024, **kw)
        rows = [RowState(params, position=256, seed=i, history=history[i].tolist() if params.needs_history else None)
                for i in range(batch)]
        ids = history.to(dev)
        stock = _stock(kw)
        ours_s = _fastest(lambda: sample(logits, rows), repeats, dev)  # noqa: B023
        stock_s = _fastest(lambda: stock(ids, logits), repeats, dev)  # noqa: B023
        records.append({"config": name, "hf_turbo_ms": 1e3 * ours_s, "stock_ms": 1e3 * stock_s,
                        "speedup": stock_s / ours_s})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"logits [{args.batch}, {args.vocab}] float32, std {LOGIT_STD}, {args.device}, {args.threads} thread(s)")
    print(f"{'config':<30} {'hf_turbo ms':>12} {'stock ms':>10} {'speedup':>8}")
    for r in run(args.batch, args.vocab, args.device, args.repeats):
        print(f"{r['config']:<30} {r['hf_turbo_ms']:>12.1f} {r['stock_ms']:>10.1f} {r['speedup']:>7.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
