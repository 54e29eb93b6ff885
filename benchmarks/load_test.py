"""Load generator for ``hf-turbo serve``: requests/s, tokens/s, TTFT and inter-token latency.

    python benchmarks/load_test.py --spawn                      # starts the fixture server itself
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --api-key KEY --concurrency 1,8,32

At each concurrency level, that many clients send streaming ``/v1/completions`` requests back to
back (``ignore_eos``, so each returns exactly ``--max-tokens`` tokens) for ``--duration`` seconds.
TTFT is request start to the first text chunk; inter-token latency is the gap between successive
text chunks. Numbers from a spawned server on a shared CPU box are indicative only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main():\n", "class Stack:\n    def __init__(self):\n",
           "    def __repr__(self):\n        return", "for i in range(10):\n    print(", "x = [1, 2, 3]\ny = "]


@dataclass
class LevelResult:
    concurrency: int
    seconds: float = 0.0
    ok: int = 0
    errors: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (ignored with --spawn)")
    p.add_argument("--spawn", action="store_true", help="start `hf-turbo serve --model fixture` on a free port")
    p.add_argument("--spawn-args", default="", help="extra arguments for the spawned server (one string)")
    p.add_argument("--api-key", default=os.environ.get("HF_TURBO_API_KEY"))
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per concurrency level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    args = p.parse_args(argv)
    try:
        args.levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if not args.levels or min(args.levels) < 1:
        p.error("--concurrency values must be >= 1")
    if args.duration <= 0 or args.max_tokens < 1:
        p.error("--duration must be > 0 and --max-tokens >= 1")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "hf_turbo.cli", "serve", "--model", "fixture", "--host", "127.0.0.1",
           "--port", str(port), *extra.split()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.terminate()
    raise RuntimeError("server did not become healthy within 180 s")


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, res: LevelResult) -> None:
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
               "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last = None
    tokens = 0
    try:
        async with client.stream("POST", "/v1/completions", json=payload) as r:
            if r.status_code != 200:
                await r.aread()
                res.errors += 1
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if not event.get("choices") or not event["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft.append(now - start)
                else:
                    res.itl.append(now - last)
                last = now
    except httpx.HTTPError:
        res.errors += 1
        return
    res.ok += 1
    res.tokens += tokens


async def run_level(url: str, headers: dict, model: str, n: int, duration: float, max_tokens: int,
                    timeout: float) -> LevelResult:
    res = LevelResult(n)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as client:
        deadline = time.perf_counter() + duration

        async def worker(i: int) -> None:
            k = i
            while time.perf_counter() < deadline:
                await one_request(client, model, PROMPTS[k % len(PROMPTS)], max_tokens, res)
                k += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(n)))
        res.seconds = time.perf_counter() - start
    return res


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def table(results: list[LevelResult]) -> str:
    head = (f"{'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} "
            f"{'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}")
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(f"{r.concurrency:>7} {r.ok:>8} {r.errors:>6} {r.ok / r.seconds:>7.2f} {r.tokens / r.seconds:>8.1f} "
                    f"{pct(r.ttft, 50) * 1e3:>7.0f}ms {pct(r.ttft, 99) * 1e3:>7.0f}ms "
                    f"{pct(r.itl, 50) * 1e3:>6.1f}ms {pct(r.itl, 99) * 1e3:>6.1f}ms")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    proc = None
    url = args.url
    if args.spawn:
        proc, url = spawn_server(args.spawn_args)
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = args.model or httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]
        # warm-up: first forwards allocate and compile
        asyncio.run(run_level(url, headers, model, 1, 0.01, 4, args.timeout))
        results = []
        for n in args.levels:
            results.append(asyncio.run(run_level(url, headers, model, n, args.duration, args.max_tokens,
                                                 args.timeout)))
            print(f"  {n} clients done", file=sys.stderr, flush=True)
        print(f"model {model!r} at {url}; streaming /v1/completions, {args.max_tokens} tokens each, "
              f"{args.duration:g} s per level")
        print(table(results))
        return 1 if any(r.errors for r in results) else 0
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
