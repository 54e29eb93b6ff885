"""Replicas vs threads on this machine: 2 engine replicas x 1 thread (Ray Serve) vs 1 engine x 2 threads.

    python benchmarks/bench_replicas.py                 # the fixture model, workload W1, both setups
    python benchmarks/bench_replicas.py --quick         # W1's quick size

Both setups are HTTP servers on this machine, driven by the same client in the same run: every W1
request is sent at once as token ids (``temperature`` 0, ``min_tokens`` = ``max_tokens`` = its output
length, so each returns exactly its tokens). The single engine is ``hf-turbo serve`` with 2 torch
threads; the replicas are ``hf-turbo serve --replicas 2``, each replica with 1 thread. The in-process
Engine (no HTTP) with 2 threads is printed as a reference. Wall time from the first request to the last
answer, the median of ``--repeats`` runs after a warm-up (the box is shared: runs vary); nothing is asserted
(a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import torch

from hf_turbo import Engine, SamplingParams
from hf_turbo.bench.workloads import build_workloads
from hf_turbo.loading import load_model_and_tokenizer
from hf_turbo.serve.launch import free_port


async def _drive(url: str, workload) -> tuple[float, int]:
    """Send every request at once; (seconds, output tokens)."""
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        responses = await asyncio.gather(*[
            client.post(url + "/v1/completions", json={"model": "m", "prompt": list(p), "max_tokens": n,
                                                       "min_tokens": n, "temperature": 0})
            for p, n in zip(workload.prompts, workload.output_lens)])
        seconds = time.perf_counter() - t0
    bad = [r.status_code for r in responses if r.status_code != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed: {bad[:5]}")
    return seconds, sum(r.json()["usage"]["completion_tokens"] for r in responses)


def _median(run, repeats: int) -> tuple[float, int, list[float]]:
    """(median seconds, tokens, every run's seconds) of ``repeats`` calls of ``run() -> (seconds, tokens)``."""
    results = [run() for _ in range(repeats)]
    runs = [r[0] for r in results]
    return sorted(runs)[len(runs) // 2], results[0][1], runs


def _serve(model: str, extra: list[str], threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "hf_turbo.cli", "serve", "--model", model, "--served-model-name", "m",
           "--device", "cpu", "--dtype", "float32", "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            # Ray's proxy answers /health only once the replicas are up; the app's /health needs the engine
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server {' '.join(extra) or '(one engine)'} did not come up")
        time.sleep(1)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(2)  # SIGINT: uvicorn / the replicas launcher shut down cleanly
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fixture")
    p.add_argument("--quick", action="store_true", help="W1's quick size (8 short requests)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setup (the median is reported)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    model, tok = load_model_and_tokenizer(args.model, dtype=torch.float32, device="cpu")
    (w1,) = build_workloads(tok, ["W1"], quick=args.quick)
    print(f"W1: {w1.description}; {w1.requested_tokens} output tokens; {os.cpu_count()} CPUs")
    rows = []

    torch.set_num_threads(2)
    engine = Engine(model, tok)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in w1.output_lens]
    engine.generate([list(q) for q in w1.warmup().prompts], use_tqdm=False)

    def in_process() -> tuple[float, int]:
        t0 = time.perf_counter()
        outs = engine.generate([list(q) for q in w1.prompts], params, use_tqdm=False)
        return time.perf_counter() - t0, sum(len(o.token_ids) for o in outs)

    rows.append(("1 engine x 2 threads, in process (no HTTP)", *_median(in_process, args.repeats)))

    for label, extra, threads in (("1 engine x 2 threads, hf-turbo serve", [], 2),
                                  ("2 replicas x 1 thread, hf-turbo serve --replicas 2", ["--replicas", "2"], 2)):
        proc, url = _serve(args.model, extra, threads)  # replicas: each takes cpu_count // 2 threads itself
        try:
            asyncio.run(_drive(url, w1.warmup()))
            rows.append((label, *_median(lambda: asyncio.run(_drive(url, w1)), args.repeats)))  # noqa: B023
        finally:
            _stop(proc)

    print(f"{'setup':<55} {'wall s':>8} {'tokens':>7} {'tok/s':>8}  runs (s)")
    for label, seconds, tokens, runs in rows:
        print(f"{label:<55} {seconds:>8.2f} {tokens:>7} {tokens / seconds:>8.1f}  {' '.join(f'{r:.2f}' for r in runs)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"setup": r[0], "seconds": r[1], "tokens": r[2], "runs": r[3]} for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
