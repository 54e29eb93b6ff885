"""``hf-turbo eval``: check the exactness contract across axes, dtypes and architectures."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "run", "options_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``hf-turbo eval`` options to ``parser`` (imports nothing heavy)."""
    from hf_turbo.eval.axes import ALL_FLAGS, AXIS_FLAGS
    from hf_turbo.eval.options import QUICK_ARCHS, REGISTRY_ARCH

    parser.add_argument("--quick", action="store_true",
                        help=f"the fixture and {', '.join(QUICK_ARCHS)}, 6 prompts, 8 new tokens (minutes on a CPU)")
    parser.add_argument("--arch", default=None,
                        help="comma list of 'fixture' and/or transformers model types (tiny random models); "
                             "'all' = every hf_turbo.testing.TINY_ARCHS model (default: fixture); "
                             f"'{REGISTRY_ARCH}' = the exactness sweep over every causal-LM type in transformers' "
                             f"registry, a table of all ('{REGISTRY_ARCH}=llama,gpt2' for some)")
    parser.add_argument("--model", default=None, metavar="PATH", help="a local decoder model directory")
    parser.add_argument("--draft-model", default=None, metavar="PATH",
                        help="draft model directory for --model's spec_draft axis")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help=".jsonl ({\"prompt\": text} or {\"input_ids\": [...]} per line) or .txt (one a line)")
    parser.add_argument("--axes", default=",".join(ALL_FLAGS),
                        help=f"comma list of {', '.join(AXIS_FLAGS)} (default: all but kv_quant, the opt-in, "
                             "informational rows of what an 8-bit KV cache costs on the model)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16, float16")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="new tokens per prompt (default 32)")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="prompts (default 16 built-in, or all of --prompts)")
    parser.add_argument("--max-prompt-tokens", type=int, default=160, help="prompts are cut to this many tokens")
    parser.add_argument("--seed", type=int, default=0, help="prompt-set and sampling seed (default 0)")
    parser.add_argument("--cache-dir", default=None, help="prompt-set cache (default ~/.cache/hf_turbo/eval)")
    parser.add_argument("--out", default=None, metavar="DIR", help="write results.json, report.md and eval.png")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: this checks correctness, not speed, and one thread "
                             "never oversubscribes a shared CPU); 0 = torch's choice")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def options_from_args(args: argparse.Namespace):
    """EvalOptions from parsed arguments (ValueError naming a bad value)."""
    from hf_turbo.eval.options import EvalOptions

    kw = {"axes": args.axes, "dtypes": args.dtypes, "model": args.model, "draft_model": args.draft_model,
          "prompts": args.prompts, "max_prompt_tokens": args.max_prompt_tokens, "seed": args.seed,
          "cache_dir": args.cache_dir, "out": args.out, "threads": args.threads or None,
          "progress": not args.no_progress}
    if args.arch is not None:
        kw["archs"] = args.arch
    elif args.model is not None:
        kw["archs"] = ()
    if args.max_new_tokens is not None:
        kw["max_new_tokens"] = args.max_new_tokens
    if args.num_prompts is not None:
        kw["num_prompts"] = args.num_prompts
    return EvalOptions.quick(**kw) if args.quick else EvalOptions(**kw)


def run_registry(spec: str, out: str | None = None, threads: int | None = 1, progress: bool = True) -> int:
    """``--arch registry[=type,...]``: the registry sweep's table; 1 if any architecture is wrong or raises."""
    import torch

    from hf_turbo.eval.options import registry_types
    from hf_turbo.eval.registry import BUGS, format_registry_table, run_sweep

    types = registry_types(spec)
    if threads:
        torch.set_num_threads(threads)
    rows = run_sweep(types, progress=progress)
    table = format_registry_table(rows)
    print(table)
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "registry.md").write_text(table + "\n")
        print(f"\nwrote {path / 'registry.md'}")
    bugs = [r.model_type for r in rows if r.result in BUGS]
    if bugs:
        print(f"\nsilently wrong or raising: {', '.join(bugs)}")
    return 1 if bugs else 0


def run(args: argparse.Namespace) -> int:
    """Run the eval; print the table; 0 if the contract holds, 1 if it fails (2: bad input, from the CLI)."""
    from hf_turbo.eval.options import REGISTRY_ARCH
    from hf_turbo.eval.report import format_divergences, format_table, write_outputs
    from hf_turbo.eval.runner import run_eval

    if args.arch is not None and args.arch.split("=")[0].strip() == REGISTRY_ARCH:
        return run_registry(args.arch, args.out, args.threads or None, not args.no_progress)
    opts = options_from_args(args)
    results = run_eval(opts)
    print(format_table(results["rows"]))
    errors = [r for r in results["rows"] if r["error"]]
    if errors:
        print("\nErrors:")
        for r in errors:
            print(f"{r['model']} {r['dtype']} {r['axis']}/{r['mode']}: {r['error']}")
    if results["divergences"]:
        print("\nDivergences:")
        print(format_divergences(results["divergences"]))
    if opts.out:
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        paths = write_outputs(results, opts.out, command)
        print(f"\nwrote {', '.join(map(str, paths))}")
    failed = [r for r in results["rows"] if r["status"] in ("FAIL", "ERROR")]
    if failed:
        print(f"\ncontract FAILED on {len(failed)} row(s): "
              + "; ".join(f"{r['model']} {r['dtype']} {r['axis']}/{r['mode']}" for r in failed[:10]))
    else:
        skipped = sum(r["status"] == "SKIP" for r in results["rows"])
        print(f"\ncontract holds: {len(results['rows']) - skipped} rows checked"
              + (f", {skipped} skipped" if skipped else "") + f" ({results['seconds']} s)")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_turbo.eval.cli`` / ``eval/run_eval.py``: the eval command alone."""
    parser = argparse.ArgumentParser(prog="hf-turbo eval", description=__doc__)
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"hf-turbo eval: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
