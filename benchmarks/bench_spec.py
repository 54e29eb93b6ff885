"""Speculative decoding on the fixture pair: acceptance, tokens per verify step, tokens/s vs plain.

    python benchmarks/bench_spec.py --threads 1 [--quick] [--device cuda]

Workloads: W2 (batch 1), B32 (32 requests at once, corpus prompts), COPY (prompts holding a stdlib
function, then its header renamed: the completion can copy from the prompt, where prompt lookup
shines). Paths: plain ``turbo_engine``, the adaptive speculative paths ``turbo_spec_draft`` /
``turbo_spec_ngram`` (k <= 4), fixed-k = 4 variants whose tokens per verify step are compared with
the i.i.d. prediction (1 - a^(k+1)) / (1 - a), and an adaptive path whose draft is an unrelated random
model (acceptance ~0: the adaptive k must not make it slower than plain). Prints one table; every
path's tokens must equal the plain engine's.
"""

from __future__ import annotations

import argparse
import random
import re

import torch

from hf_turbo.bench import BenchContext, load_model
from hf_turbo.bench.paths import PATHS, register_path
from hf_turbo.bench.turbo_paths import SPEC_TOKENS, _engine_run, spec_engine_run
from hf_turbo.bench.workloads import Workload, _stdlib_text, build_workloads, corpus_token_ids
from hf_turbo.config import SpeculativeConfig
from hf_turbo.engine.spec import expected_tokens
from hf_turbo.testing import fixture_path, tiny_model

PATH_NAMES = ["turbo_engine", "turbo_spec_draft", "turbo_spec_ngram", "spec_draft_fixed", "spec_ngram_fixed",
              "spec_draft_unrelated"]


def _copy_workload(tokenizer, n: int, out: int, seed: int = 0) -> Workload:
    """Prompts: a stdlib method, a blank line, then the same method renamed, up to its first body line."""
    funcs = re.findall(r"\n(    def \w+\(.*?\):\n(?:        .*\n|\n){4,14})", _stdlib_text())
    rng = random.Random(seed)
    prompts = []
    for src in rng.sample(funcs, n):
        header, first = src.split("\n")[:2]
        renamed = re.sub(r"def (\w+)", r"def \1_v2", header, count=1)
        prompt = src + "\n" + renamed + "\n" + first + "\n"
        prompts.append(tuple(tokenizer(prompt, add_special_tokens=False)["input_ids"]))
    return Workload("COPY", f"copy-from-prompt: {n} requests, a method then its renamed start, output {out}",
                    tuple(prompts), tuple(out for _ in prompts))


def _batch_workload(tokenizer, n: int, prompt: int, out: int, seed: int = 0) -> Workload:
    corpus = corpus_token_ids(tokenizer)
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        start = rng.randrange(0, len(corpus) - prompt)
        prompts.append(tuple(corpus[start:start + prompt]))
    return Workload("B32", f"batch: {n} requests at once, prompt {prompt}, output {out}", tuple(prompts),
                    tuple(out for _ in prompts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per path (the fastest is reported)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tok = load_model(fixture_path("target"), torch.float32, device)
    register_path("spec_draft_fixed", lambda c, w: spec_engine_run(c, w, "draft", adaptive=False))
    register_path("spec_ngram_fixed", lambda c, w: spec_engine_run(c, w, "ngram", adaptive=False))
    unrelated = tiny_model("llama", vocab_size=model.get_output_embeddings().weight.shape[0]).to(device)
    register_path("spec_draft_unrelated", lambda c, w: _engine_run(
        c, w, True, SpeculativeConfig("draft", draft_model=unrelated, num_tokens=SPEC_TOKENS)))
    size = 32 if args.quick else 64
    workloads = [*build_workloads(tok, ["W2"], quick=args.quick), _batch_workload(tok, 32, size, size),
                 _copy_workload(tok, 8, size)]
    ctx = BenchContext(model, tok, device, torch.float32, progress=False)
    print(f"{'workload':8} {'path':20} {'tok/s':>8} {'vs plain':>8} {'acc/prop':>8} {'a (pos)':>8} {'tok/step':>8} "
          f"{'iid pred':>8} {'steps':>6} exact")
    for w in workloads:
        for name in PATH_NAMES:
            PATHS[name].fn(ctx, w.warmup())
        runs: dict[str, list] = {name: [] for name in PATH_NAMES}
        for _ in range(args.repeats):  # round robin, so load drifts on a shared machine hit every path alike
            for name in PATH_NAMES:
                runs[name].append(PATHS[name].fn(ctx, w))
        results = {name: min(rs, key=lambda r: r.seconds) for name, rs in runs.items()}  # least disturbed run
        base = results["turbo_engine"]
        for name, r in results.items():
            ex = r.extra
            rate, a = ex.get("acceptance_rate"), ex.get("spec_position_acceptance")
            pred = expected_tokens(a, SPEC_TOKENS) if a is not None and not ex.get("spec_adaptive", True) else None
            tps = w.requested_tokens / r.seconds

            def fmt(x, spec=".3f"):
                return "" if x is None else format(x, spec)

            per_step = ex.get("mean_accepted_per_step")
            print(f"{w.name:8} {name:20} {tps:8.1f} {base.seconds / r.seconds:8.2f} {fmt(rate):>8} {fmt(a):>8} "
                  f"{fmt(per_step, '.2f'):>8} {fmt(pred, '.2f'):>8} {ex['steps']:6d} {r.outputs == base.outputs}",
                  flush=True)


if __name__ == "__main__":
    main()
