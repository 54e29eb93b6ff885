"""Per-token cost of the stop-string check at a long output: full decode per token (the old rule) vs
the incremental matcher, same token stream, same run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_stops.py --length 2000
"""

from __future__ import annotations

import argparse
import time

from transformers import AutoTokenizer

from hf_turbo.engine.stops import StopStringMatcher, byte_pieces
from hf_turbo.testing import fixture_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2000, help="output tokens")
    parser.add_argument("--window", type=int, default=100, help="tokens timed at the end of the output")
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(fixture_path("target"))
    text = open(__file__.replace("bench_stops.py", "gpu_check.py"), encoding="utf-8").read() * 20
    ids = tok.encode(text, add_special_tokens=False)[:args.length]
    stops = ["never appears 1", "never appears 2"]
    pieces = byte_pieces(tok)
    head, tail = ids[:-args.window], ids[-args.window:]

    def old_rule(prefix: list[int]) -> float:
        out = list(prefix)
        start = time.perf_counter()
        for t in tail:
            out.append(t)
            decoded = tok.decode(out, skip_special_tokens=True)
            if any(s in decoded for s in stops):
                break
        return (time.perf_counter() - start) / len(tail)

    def new_rule(prefix: list[int]) -> float:
        m = StopStringMatcher(tok, stops, pieces)
        for t in prefix:
            m.push(t)
        start = time.perf_counter()
        for t in tail:
            if m.push(t):
                break
        return (time.perf_counter() - start) / len(tail)

    old = min(old_rule(head) for _ in range(3))
    new = min(new_rule(head) for _ in range(3))
    print(f"| output length | full decode per token | incremental matcher | ratio |\n|---|---|---|---|\n"
          f"| {len(ids)} | {old * 1e6:.1f} us | {new * 1e6:.2f} us | {old / new:.0f}x |")


if __name__ == "__main__":
    main()
