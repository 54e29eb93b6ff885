"""cProfile one Engine run on a shipped shape: which ops and Python functions a step costs.

Timings on a shared VM move by 10-50% between runs; call counts and the split between ops and Python do
not. To compare two commits, run this from each checkout (``PYTHONPATH=<checkout>``) and compare the
function-call totals and the op rows::

    python benchmarks/profile_engine.py --shape smollm2-135m --layers 8 --workload W1 --top 25
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

import hf_turbo
from hf_turbo.bench import shapes
from hf_turbo.bench.workloads import WORKLOAD_NAMES, build_workloads
from hf_turbo.sampling import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=shapes.SHAPES)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    parser.add_argument("--workload", default="W1", choices=WORKLOAD_NAMES)
    parser.add_argument("--full", action="store_true", help="the full workload instead of --quick's")
    parser.add_argument("--prefix-caching", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=25, help="rows of the profile, by own time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = shapes.build(args.shape, torch.float32, torch.device("cpu"), num_layers=args.layers)
    (workload,) = build_workloads(tokenizer, [args.workload], quick=not args.full)

    def run() -> float:
        hf_turbo.accelerate(model, enable_prefix_caching=args.prefix_caching)
        try:
            engine = hf_turbo.get_engine(model)
            params = [SamplingParams(max_new_tokens=n, min_new_tokens=n, ignore_eos=True)
                      for n in workload.output_lens]
            start = time.perf_counter()
            engine.generate([list(p) for p in workload.prompts], params, use_tqdm=False)
            return time.perf_counter() - start
        finally:
            hf_turbo.restore(model)

    print(f"warm-up run: {run():.3f} s")
    profile = cProfile.Profile()
    profile.enable()
    seconds = run()
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
    print(f"profiled run: {seconds:.3f} s")
    print(out.getvalue())


if __name__ == "__main__":
    main()
