"""``hf-turbo bench``: every generation path, side by side, on the same model and prompts, in one process.

Paths (``paths.PATHS``; add one with ``register_path(name, fn)``) run the workloads W1-W3
(``workloads.py``); the machine's matmul and memory-copy ceilings are measured in the same run
(``ceilings.py``); ``report.py`` prints the table and writes the JSON and the plot.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from hf_turbo.bench import turbo_paths  # noqa: F401  (registers hf_turbo's paths)
from hf_turbo.bench.ceilings import machine_info, measure_ceilings, model_matmul_params
from hf_turbo.bench.paths import (
    PATHS,
    BenchContext,
    BenchPath,
    PathResult,
    PathUnavailable,
    baseline_path,
    register_path,
)
from hf_turbo.bench.report import FLOP_NOTE, add_derived, format_table, plot, write_json
from hf_turbo.bench.shapes import LOGIT_STD, SHAPES
from hf_turbo.bench.shapes import build as build_shape
from hf_turbo.bench.workloads import WORKLOAD_NAMES, Workload, build_workloads

__all__ = [
    "PATHS",
    "BenchContext",
    "BenchPath",
    "PathResult",
    "PathUnavailable",
    "Workload",
    "add_arguments",
    "load_model",
    "measure_path",
    "register_path",
    "run",
]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``hf-turbo bench`` options to ``parser``."""
    parser.add_argument("--model", default=None, help="local model directory (default: the trained fixture)")
    parser.add_argument(
        "--shape", default=None, choices=list(SHAPES),
        help="a shipped model shape with random weights instead of --model (logits scaled to a trained spread)",
    )
    parser.add_argument("--shape-layers", type=int, default=None, metavar="N",
                        help="with --shape: N decoder layers instead of the shape's own (a slow machine)")
    parser.add_argument(
        "--sampling", default="greedy", metavar="MODE",
        help="greedy | default (temperature 1.0, as OpenAI's API) | T,top_p,top_k (e.g. 0.8,0.95,0); every "
             "path decodes with it",
    )
    parser.add_argument(
        "--workloads",
        default="all",
        help=f"comma-separated subset of {','.join(WORKLOAD_NAMES)} (default all)",
    )
    parser.add_argument("--paths", default="all", help="comma-separated paths (default: all registered)")
    parser.add_argument("--quick", action="store_true", help="much smaller workloads (seconds on a CPU)")
    parser.add_argument(
        "--json", default=None, metavar="PATH", help="write all numbers as JSON ('-' = stdout)"
    )
    parser.add_argument("--plot", default=None, metavar="PNG", help="write a bar plot of tokens/s")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument(
        "--max-batch", type=int, default=64, help="most requests per batched generate() call (default 64)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads for the run (default: torch's choice)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, metavar="N",
        help="N timed runs of every path, round robin, each reporting its fastest (default: each workload's "
             "own count, median; use on a shared or noisy machine)",
    )


def _split(value: str, known: list[str], what: str) -> list[str]:
    if value.strip() == "all":
        return list(known)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown or value!r}; choose from {known}")
    return names


def parse_sampling(value: str) -> dict[str, float] | None:
    """``--sampling``: None for greedy, else the temperature/top_p/top_k every path samples with."""
    if value == "greedy":
        return None
    if value == "default":
        return {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    parts = value.split(",")
    try:
        if len(parts) != 3:
            raise ValueError
        temperature, top_p, top_k = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"--sampling must be greedy, default or T,top_p,top_k, got {value!r}") from None
    if not (temperature > 0 and 0 < top_p <= 1 and top_k >= 0):
        raise ValueError(f"--sampling {value!r}: needs temperature > 0, top_p in (0, 1], top_k >= 0")
    return {"temperature": temperature, "top_p": top_p, "top_k": top_k}


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    return torch.device(name)


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """Load model and tokenizer from a local directory; ValueError naming ``path`` if that fails."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(
            f"--model {str(path)!r} is not a directory (expected a local Hugging Face model dir)"
        )
    if not (p / "config.json").is_file():
        raise ValueError(f"--model {str(path)!r} has no config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True)
    except Exception as exc:  # any loader failure: report the path, not a deep traceback
        raise ValueError(f"--model {str(path)!r} could not be loaded: {type(exc).__name__}: {exc}") from exc
    return model.to(device).eval(), tokenizer


def measure_path(ctx: BenchContext, path: BenchPath, workload: Workload) -> dict[str, Any]:
    """Warm up, run ``workload.repeats`` timed runs, and check token counts; one record.

    The record is JSON-ready except ``_outputs`` (the median run's token ids), which ``run`` uses for
    ``exact_match_vs_baseline`` and then drops. A ``PathUnavailable`` gives ``status="unavailable"``,
    any other exception ``status="error"``; both carry a ``reason``.
    """
    try:
        path.fn(ctx, workload.warmup())
        runs: list[PathResult] = []
        for _ in range(workload.repeats):
            torch.manual_seed(ctx.seed)
            runs.append(path.fn(ctx, workload))
    except Exception as exc:
        return _failed_record(path, workload, exc)
    return _record(path, workload, runs)


def measure_round_robin(ctx: BenchContext, paths: list[BenchPath], workload: Workload, repeats: int
                        ) -> list[dict[str, Any]]:
    """Every path warmed up, then ``repeats`` rounds of one timed run per path; each record reports its
    fastest run. Load that drifts on a shared machine then hits every path alike, and the fastest run is
    the least disturbed one."""
    runs: dict[str, list[PathResult]] = {p.name: [] for p in paths}
    failed: dict[str, dict[str, Any]] = {}
    for path in paths:
        try:
            path.fn(ctx, workload.warmup())
        except Exception as exc:
            failed[path.name] = _failed_record(path, workload, exc)
    for _ in range(repeats):
        for path in paths:
            if path.name in failed:
                continue
            logger.info("%s: %s (round robin)", workload.name, path.name)
            try:
                torch.manual_seed(ctx.seed)
                runs[path.name].append(path.fn(ctx, workload))
            except Exception as exc:
                failed[path.name] = _failed_record(path, workload, exc)
    return [failed.get(p.name) or _record(p, workload, runs[p.name], fastest=True) for p in paths]


def _base_record(path: BenchPath, workload: Workload) -> dict[str, Any]:
    return {
        "workload": workload.name,
        "path": path.name,
        "baseline": path.baseline,
        "status": "ok",
        "reason": None,
        "n_requests": workload.n_requests,
        "requested_tokens": workload.requested_tokens,
    }


def _failed_record(path: BenchPath, workload: Workload, exc: Exception) -> dict[str, Any]:
    record = _base_record(path, workload)
    if isinstance(exc, PathUnavailable):
        logger.warning("%s unavailable on %s: %s", path.name, workload.name, exc)
        return {**record, "status": "unavailable", "reason": str(exc)}
    logger.error("%s failed on %s", path.name, workload.name, exc_info=exc)
    return {**record, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}


def _record(path: BenchPath, workload: Workload, runs: list[PathResult], fastest: bool = False) -> dict[str, Any]:
    """One record from a path's timed runs: the median run (or the fastest), token counts checked."""
    record = _base_record(path, workload)
    if fastest:
        result = min(runs, key=lambda r: r.seconds)
        seconds = result.seconds
    else:
        result = runs[len(runs) // 2]
        seconds = statistics.median(r.seconds for r in runs)
    if len(result.outputs) != workload.n_requests:
        return {
            **record,
            "status": "error",
            "reason": f"{len(result.outputs)} outputs for {workload.n_requests}",
        }
    generated = sum(len(o) for o in result.outputs)
    counted = sum(min(len(o), n) for o, n in zip(result.outputs, workload.output_lens, strict=True))
    consistent = (
        all([len(o) for o in r.outputs] == list(workload.output_lens) for r in runs)
        and generated == counted == workload.requested_tokens
    )
    if not consistent:
        logger.error(
            "%s on %s: generated %d tokens, requested %d",
            path.name,
            workload.name,
            generated,
            workload.requested_tokens,
        )
    record.update(
        generated_tokens=generated,
        counted_tokens=counted,
        tokens_consistent=consistent,
        wasted_tokens=result.wasted_tokens,
        tokens_processed=result.tokens_processed,
        seconds=seconds,
        seconds_runs=[r.seconds for r in runs],
        tokens_per_s=counted / seconds if seconds > 0 else 0.0,
        extra=result.extra,
        _outputs=result.outputs,
    )
    return record


def _exact_match(records: list[dict[str, Any]], baseline: str | None) -> None:
    """Fraction of requests whose greedy tokens equal the baseline's (informative, not a pass/fail)."""
    base = {r["workload"]: r["_outputs"] for r in records if r["path"] == baseline and "_outputs" in r}
    for r in records:
        outputs = r.pop("_outputs", None)
        ref = base.get(r["workload"])
        r["exact_match_vs_baseline"] = (
            None
            if outputs is None or ref is None
            else sum(a == b for a, b in zip(outputs, ref, strict=True)) / len(ref)
        )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see ``add_arguments``); 0 ok, 1 a path failed, 2 bad input."""
    try:
        workload_names = _split(args.workloads, list(WORKLOAD_NAMES), "workload(s)")
        path_names = _split(args.paths, list(PATHS), "path(s)")
        if args.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
        if getattr(args, "repeats", None) is not None and args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        device, dtype = _device(args.device), _DTYPES[args.dtype]
        sampling = parse_sampling(getattr(args, "sampling", "greedy"))
        shape = getattr(args, "shape", None)
        if shape is not None:
            if args.model is not None:
                raise ValueError("--shape and --model exclude each other")
            model_path = f"shape:{shape}"
            model, tokenizer = build_shape(shape, dtype, device, args.shape_layers, seed=args.seed)
        else:
            model_path = args.model
            if model_path is None:
                from hf_turbo.testing import fixture_path

                model_path = str(fixture_path("target"))
            model, tokenizer = load_model(model_path, dtype, device)
        workloads = build_workloads(tokenizer, workload_names, quick=args.quick, seed=args.seed)
        max_pos = getattr(model.config, "max_position_embeddings", None)
        for w in workloads:
            if max_pos is not None and w.max_total_len > max_pos:
                raise ValueError(f"workload {w.name} needs {w.max_total_len} positions; model has {max_pos}")
    except (ValueError, FileNotFoundError) as exc:
        print(f"hf-turbo bench: error: {exc}", file=sys.stderr)
        return 2

    ctx = BenchContext(model, tokenizer, device, dtype, seed=args.seed, max_batch=args.max_batch, sampling=sampling)
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _bench(args, ctx, str(model_path), workloads, path_names)
    finally:
        torch.set_num_threads(threads_before)


def _warn_if_busy(device: torch.device) -> None:
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.type == "cpu" and load > 0.75 * cores:
        logger.warning(
            "machine is busy (1-min load %.1f on %d cores): CPU timings will be noisy; with other jobs "
            "running, --threads 1 avoids thread oversubscription",
            load,
            cores,
        )


def _bench(
    args: argparse.Namespace,
    ctx: BenchContext,
    model_path: str,
    workloads: list[Workload],
    path_names: list[str],
) -> int:
    """Measure ceilings and every (workload, path); print, write JSON/plot; the exit code."""
    _warn_if_busy(ctx.device)
    torch.manual_seed(args.seed)
    baseline = baseline_path() if baseline_path() in path_names else None
    logger.info("measuring machine ceilings on %s", ctx.device)
    ceilings = measure_ceilings(ctx.device, ctx.dtype, quick=args.quick)
    n_params = model_matmul_params(ctx.model)
    records = []
    for w in workloads:
        if getattr(args, "repeats", None) is not None:
            records.extend(measure_round_robin(ctx, [PATHS[name] for name in path_names], w, args.repeats))
            continue
        for name in path_names:
            logger.info("%s: %s", w.name, name)
            records.append(measure_path(ctx, PATHS[name], w))
    _exact_match(records, baseline)
    if ctx.sampling is not None:  # each path draws its own random tokens: no token comparison
        for r in records:
            r["exact_match_vs_baseline"] = None
    add_derived(records, baseline, ceilings.compute_gflops(ctx.dtype), n_params)

    table = format_table(records, baseline)
    print(table, file=sys.stderr if args.json == "-" else sys.stdout, flush=True)
    doc = {
        "machine": machine_info(ctx.device, ctx.dtype),
        "config": {
            "model": model_path,
            "model_type": ctx.model.config.model_type,
            "shape": getattr(args, "shape", None),
            "num_layers": ctx.model.config.get_text_config().num_hidden_layers,
            "vocab_size": ctx.model.config.get_text_config().vocab_size,
            "sampling": ctx.sampling,
            "n_params_matmul": n_params,
            "quick": args.quick,
            "seed": args.seed,
            "max_batch": args.max_batch,
            "repeats": getattr(args, "repeats", None),
            "baseline": baseline,
            "workloads": [w.name for w in workloads],
            "paths": path_names,
        },
        "ceilings": ceilings.to_dict(),
        "workloads": {w.name: w.summary() for w in workloads},
        "results": records,
        "notes": [
            FLOP_NOTE,
            "tokens_per_s = counted_tokens / seconds; counted_tokens credits each request at most its "
            "own requested length; hf_padded decodes max(output lens) per batch, the rest is wasted_tokens.",
            "hf_padded splits requests, in order, into batches of at most max_batch.",
            "hf_cb seconds exclude manager start-up (extra.setup_s); W2 seconds are the median of 3 runs.",
            f"--shape models have random weights with the output embedding scaled to logit std {LOGIT_STD}; "
            "sampler % is the engine's time in hf_turbo.sampling.sample (device synchronized) over the run.",
        ],
    }
    if args.json:
        write_json(doc, args.json)
    if args.plot:
        title = f"hf-turbo bench ({ctx.device.type}, {args.dtype}, {Path(model_path).name})"
        plot(records, args.plot, title)
    failed = [r for r in records if r["status"] == "error"]
    inconsistent = [r for r in records if r["status"] == "ok" and not r["tokens_consistent"]]
    return 1 if failed or inconsistent else 0
