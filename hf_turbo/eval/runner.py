"""Run the eval: per model and dtype, stock references, then every axis, judged by the contract.

For each model and dtype: stock ``generate()`` runs each prompt alone (greedy, no padding) and
keeps, at every step, its top-2 score gap and second choice; the stock forward gives the
teacher-forced log-likelihoods of prompt + stock continuation. Then the model is accelerated and
each axis runs the same prompts (greedy, then seeded sampling); the ``turbo_equivalence`` metric
(loaded with ``evaluate.load`` from its local file) compares, and :mod:`hf_turbo.eval.contract`
gives each row its verdict. The model is restored to stock at the end, whatever happened.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from contextlib import contextmanager
from typing import Any

import torch

import hf_turbo
from hf_turbo.config import TurboConfig
from hf_turbo.engine.request import eos_ids
from hf_turbo.eval import contract
from hf_turbo.eval.axes import AXES, GREEDY_ONLY, AxisSkipped, EvalTarget, blocks_for, runs_for_flags, timed
from hf_turbo.eval.contract import METRIC_PATH
from hf_turbo.eval.kv_quant import kv_quant_rows
from hf_turbo.eval.models import EvalModel, check_model_dir, load_eval_model
from hf_turbo.eval.options import EvalOptions
from hf_turbo.eval.prompts import build_prompt_dataset, encode_prompts, load_prompt_file
from hf_turbo.sampling import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["run_eval", "METRIC_PATH", "load_metric"]

SAMPLING = {"temperature": 0.8, "top_p": 0.95}
TOP_K = 8  # stock's ranking kept per step: enough to judge ties of up to 8 tokens


def load_metric(config_name: str = "default"):
    """The ``turbo_equivalence`` metric via ``evaluate.load`` on its local file (never the hub)."""
    import evaluate

    return evaluate.load(METRIC_PATH, config_name, keep_in_memory=True)


@contextmanager
def _quiet_libraries():
    """transformers' warnings and progress bars, and datasets' bars, off: one tqdm bar, then the table."""
    import datasets
    from transformers.utils import logging as hf_logging

    level, hf_bars, ds_bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), \
        not datasets.are_progress_bars_disabled()
    hf_logging.set_verbosity_error()  # generation-flag warnings would drown the table
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if hf_bars:
            hf_logging.enable_progress_bar()
        if ds_bars:
            datasets.enable_progress_bars()


def _pad_id(model, tok) -> int:
    for value in (getattr(tok, "pad_token_id", None), model.generation_config.pad_token_id, *eos_ids(model)):
        if value is not None:
            return int(value)
    return 0


@torch.no_grad()
def stock_reference(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int
                    ) -> tuple[list[list[int]], list[list[list[int]]], list[list[list[float]]]]:
    """Stock greedy ``generate()`` one prompt at a time: new ids and, per step, stock's TOP_K ranking
    (token ids, and the top score minus each one's score)."""
    outs, topk_ids, topk_gaps = [], [], []
    for p in prompts:
        ids = torch.tensor([p], device=model.device)
        res = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id, return_dict_in_generate=True,
                             output_scores=True)
        outs.append(res.sequences[0, len(p):].tolist())
        top = [torch.topk(s[0].float(), min(TOP_K, s.shape[-1])) for s in res.scores]
        topk_ids.append([t.indices.tolist() for t in top])
        topk_gaps.append([(t.values[0] - t.values).tolist() for t in top])
    return outs, topk_ids, topk_gaps


def _next_token_logprobs(logits: torch.Tensor, seq: list[int]) -> list[float]:
    """log p(seq[j+1] | seq[:j+1]) for each j, from logits [len(seq), V]."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    return logp.gather(1, torch.tensor(seq[1:], device=logp.device)[:, None])[:, 0].tolist()


@torch.no_grad()
def stock_logprobs(model, seqs: list[list[int]]) -> list[list[float]]:
    """Teacher-forced per-token log-likelihoods under the stock forward, one sequence at a time."""
    return [_next_token_logprobs(model(input_ids=torch.tensor([s], device=model.device)).logits[0], s)
            for s in seqs]


def turbo_logprobs(model, tokenizer, seqs: list[list[int]], config: TurboConfig) -> list[list[float]]:
    """The same under hf_turbo: sequences packed into one paged varlen forward (several when the
    logits would be large), logits at every position (``ModelRunner.execute(logit_rows=...)``)."""
    from hf_turbo.engine.request import Request

    bs = config.cache.block_size
    need = sum(math.ceil(len(s) / bs) for s in seqs)
    engine = hf_turbo.Engine(model, tokenizer, config.replace(enable_prefix_caching=False, num_blocks=need + 1))
    max_tokens = max(max(map(len, seqs)), (1 << 25) // max(1, engine.vocab_size))
    out: list[list[float]] = []
    i = 0
    while i < len(seqs):
        group, total = [], 0
        while i < len(seqs) and (not group or total + len(seqs[i]) <= max_tokens):
            group.append(seqs[i])
            total += len(seqs[i])
            i += 1
        reqs = [Request(f"tf-{j}", s, SamplingParams(), 0) for j, s in enumerate(group)]
        for r in reqs:
            r.block_ids = engine.pool.allocate(math.ceil(r.num_tokens / bs))
        try:
            logits = engine.runner.execute([(r, r.num_tokens) for r in reqs],
                                           logit_rows=[list(range(len(s))) for s in group])
        finally:
            for r in reqs:
                engine.pool.free(reversed(r.block_ids))
        start = 0
        for s in group:
            out.append(_next_token_logprobs(logits[start:start + len(s)], s))
            start += len(s)
    return out


def _tasks_per_model(runs: list[str], opts: EvalOptions) -> int:
    """Progress-bar units per (model, dtype): stock, greedy runs, sampled runs (+ reference), teacher forcing."""
    sampled = [r for r in runs if r not in GREEDY_ONLY] if "sampling" in opts.axes else []
    ref = 1 if sampled and "engine" not in runs else 0
    return 1 + len(runs) + len(sampled) + ref + ("teacher_forced" in opts.axes) + ("kv_quant" in opts.axes)


def _validate(opts: EvalOptions) -> tuple[list[str], Any]:
    """Check every input before any model runs; returns the model specs and the user's prompts."""
    from hf_turbo.testing.tiny import tiny_config

    specs = []
    for arch in opts.archs:
        if arch != "fixture":
            tiny_config(arch)  # ValueError naming an unknown or non-decoder model type
        specs.append(arch)
    if opts.model is not None:
        check_model_dir(opts.model)
        specs.append(f"path:{opts.model}")
    if opts.draft_model is not None:
        check_model_dir(opts.draft_model, "--draft-model")
    user = load_prompt_file(opts.prompts) if opts.prompts else None
    return specs, user


def run_eval(opts: EvalOptions) -> dict:
    """Run every (model, dtype, axis, mode); returns the results (``results["passed"]``: the verdict).

    ValueError (before anything runs) for a bad model path, model type, prompt file or option.
    """
    from tqdm.auto import tqdm

    specs, user_prompts = _validate(opts)
    threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    runs = runs_for_flags(opts.axes)
    metric, tf_metric = load_metric("default"), load_metric("teacher_forced")
    started = time.perf_counter()
    rows: list[dict] = []
    total = len(specs) * len(opts.dtypes) * _tasks_per_model(runs, opts)
    bar = tqdm(total=total, desc="hf-turbo eval", unit="run", dynamic_ncols=True, disable=not opts.progress)
    try:
        with _quiet_libraries():
            for spec in specs:
                for dtype in opts.dtypes:
                    bar.set_postfix_str(f"{spec} {dtype} loading")
                    em = load_eval_model(spec, dtype, opts.draft_model)
                    rows.extend(_eval_one(em, dtype, opts, runs, user_prompts, metric, tf_metric, bar))
    finally:
        bar.close()
        torch.set_num_threads(threads)
    divergences = [dict(d, model=r["model"], dtype=r["dtype"], axis=r["axis"], mode=r["mode"])
                   for r in rows for d in r.get("divergences", [])]
    return {
        "passed": not any(r["status"] in (contract.FAIL, contract.ERROR) for r in rows),
        "contract": contract.CONTRACT,
        "thresholds": {"near_tie": {d: contract.near_tie_threshold(d) for d in opts.dtypes},
                       "teacher_forced": {d: contract.teacher_forced_tol(d) for d in opts.dtypes}},
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.__dict__.items()},
        "versions": _versions(),
        "rows": rows,
        "divergences": divergences,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _versions() -> dict:
    import platform

    import transformers

    return {"hf_turbo": hf_turbo.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": "cuda" if torch.cuda.is_available() else "cpu"}


def _row(em: EvalModel, dtype: str, axis: str, mode: str, **fields) -> dict:
    row = {"model": em.name, "dtype": dtype, "axis": axis, "mode": mode, "status": contract.SKIP,
           "num_sequences": 0, "exact_match": None, "token_match": None, "num_divergences": 0,
           "num_near_ties": 0, "num_unexplained": 0, "first_divergence": [], "divergences": [], "stats": {},
           "note": "", "error": None, "seconds": 0.0, "exercised": True}
    row.update(fields)
    return row


def _plain_greedy_config(model):
    """The model's generation config reduced to its token ids: stock and every axis decode plain greedy
    (a repetition penalty or banned words in a checkpoint's config would otherwise apply to stock only)."""
    from transformers import GenerationConfig

    gc = model.generation_config
    return GenerationConfig(eos_token_id=gc.eos_token_id, pad_token_id=gc.pad_token_id, bos_token_id=gc.bos_token_id)


def _eval_one(em: EvalModel, dtype: str, opts: EvalOptions, runs: list[str], user_prompts, metric, tf_metric,
              bar) -> list[dict]:
    model, tok = em.model, em.tokenizer
    model.generation_config = _plain_greedy_config(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    n = opts.resolved_num_prompts
    ds = user_prompts if user_prompts is not None else build_prompt_dataset(n, vocab, opts.seed, opts.cache_dir)
    if n is not None and len(ds) > n:
        ds = ds.select(range(n))
    prompts = encode_prompts(ds, tok, vocab, opts.max_prompt_tokens)
    ids, kinds = list(ds["id"]), list(ds["kind"])
    pad = _pad_id(model, tok)
    n_new = opts.max_new_tokens

    bar.set_postfix_str(f"{em.name} {dtype} stock")
    stock, topk_ids, topk_gaps = stock_reference(model, prompts, n_new, pad)
    tf_stock = stock_logprobs(model, [p + o for p, o in zip(prompts, stock)]) if "teacher_forced" in opts.axes \
        else None
    bar.update(1)

    config = TurboConfig(debug_checks=True).replace(num_blocks=blocks_for(prompts, n_new, 16))
    target = EvalTarget(model, tok, prompts, n_new, config, pad, eos_ids(model), em.draft_loader)
    hf_turbo.accelerate(model, config)
    try:
        return _eval_turbo(em, dtype, opts, runs, target, (stock, topk_ids, topk_gaps, tf_stock), (ids, kinds),
                           metric, tf_metric, bar)
    finally:  # back to stock whatever happened (the draft too, if an axis accelerated it)
        for m in (model, target._draft):
            if m is not None and hf_turbo.is_accelerated(m):
                hf_turbo.restore(m)


def _eval_turbo(em: EvalModel, dtype: str, opts: EvalOptions, runs: list[str], target: EvalTarget, ref: tuple,
                labels: tuple[list[str], list[str]], metric, tf_metric, bar) -> list[dict]:
    stock, topk_ids, topk_gaps, tf_stock = ref
    ids, kinds = labels
    model, tok, prompts, n_new, config = target.model, target.tokenizer, target.prompts, target.max_new_tokens, \
        target.config
    threshold = contract.near_tie_threshold(dtype)
    greedy = [SamplingParams(max_new_tokens=n_new)] * len(prompts)
    rows = []
    base_outputs = None  # the engine axis's greedy tokens, for the quantized-KV rows

    def label(divs: list[dict]) -> list[dict]:
        return [dict(d, prompt_id=ids[d["row"]], prompt_kind=kinds[d["row"]]) for d in divs]

    def run_axis(axis: str, mode: str, params: list[SamplingParams]) -> tuple[dict, Any]:
        bar.set_postfix_str(f"{em.name} {dtype} {axis} {mode}")
        try:
            res, secs = timed(lambda: AXES[axis](target, params))
        except AxisSkipped as exc:
            return _row(em, dtype, axis, mode, note=f"skipped: {exc}"), None
        except Exception as exc:  # an axis that raises breaks the contract: report it, run the rest
            logger.debug("axis %s (%s, %s) raised:\n%s", axis, em.name, dtype, traceback.format_exc())
            return _row(em, dtype, axis, mode, status=contract.ERROR, error=f"{type(exc).__name__}: {exc}",
                        num_sequences=len(prompts)), None
        finally:
            bar.update(1)
        fields = {"stats": {k: v for k, v in res.stats.items() if isinstance(v, (int, float))},
                  "note": res.note + ("" if res.exercised else " (not exercised)"), "exercised": res.exercised,
                  "seconds": round(secs, 2)}
        return _row(em, dtype, axis, mode, **fields), res

    for axis in runs:
        row, res = run_axis(axis, "greedy", greedy)
        if res is not None and axis == "engine":
            base_outputs = res.outputs
        if res is not None:
            m = metric.compute(predictions=res.outputs, references=stock, topk_ids=topk_ids, topk_gaps=topk_gaps,
                               near_tie_threshold=threshold)
            row.update(_metric_fields(m), divergences=label(m["divergences"]),
                       status=contract.PASS if m["all_explained"] else contract.FAIL)
        rows.append(row)

    if "sampling" in opts.axes and any(a not in GREEDY_ONLY for a in runs):
        sampled = [SamplingParams(max_new_tokens=n_new, seed=opts.seed * 100_003 + i, **SAMPLING)
                   for i in range(len(prompts))]
        ref_row, ref = run_axis("engine", "sampled", sampled)
        ref_row.update(status=contract.REF if ref is not None else ref_row["status"],
                       num_sequences=len(prompts), note="reference for the sampled runs")
        rows.append(ref_row)
        for axis in runs:
            if axis in GREEDY_ONLY or axis == "engine":
                continue
            row, res = run_axis(axis, "sampled", sampled)
            if res is not None and ref is None:
                row.update(status=contract.SKIP, note="skipped: the Engine batch sampled reference failed")
            elif res is not None:
                m = metric.compute(predictions=res.outputs, references=ref.outputs)
                verdict = contract.PASS if m["all_explained"] else contract.FAIL
                row.update(_metric_fields(m), divergences=label(m["divergences"]),
                           status=verdict if dtype == "float32" else contract.INFO)
            rows.append(row)

    seqs = [p + o for p, o in zip(prompts, stock)]
    tf_turbo = None
    if tf_stock is not None:
        bar.set_postfix_str(f"{em.name} {dtype} teacher_forced")
        try:
            tf_turbo = turbo_logprobs(model, tok, seqs, config)
            m = tf_metric.compute(predictions=tf_turbo, references=tf_stock)
            tol = contract.teacher_forced_tol(dtype)
            rows.append(_row(em, dtype, "teacher_forced", "forward", num_sequences=len(seqs),
                             status=contract.PASS if m["max_abs_diff"] <= tol else contract.FAIL,
                             stats={"max_abs_diff": m["max_abs_diff"], "mean_abs_diff": m["mean_abs_diff"],
                                    "num_tokens": m["num_tokens"]},
                             note=f"max |dlogp| {m['max_abs_diff']:.2e}, mean {m['mean_abs_diff']:.2e} "
                                  f"(tol {tol:g})"))
        except Exception as exc:
            logger.debug("teacher forcing raised:\n%s", traceback.format_exc())
            rows.append(_row(em, dtype, "teacher_forced", "forward", status=contract.ERROR,
                             error=f"{type(exc).__name__}: {exc}"))
        bar.update(1)
    if "kv_quant" in opts.axes:
        bar.set_postfix_str(f"{em.name} {dtype} kv_quant")
        rows += kv_quant_rows(target, greedy, base_outputs,
                              tf_turbo if tf_turbo is not None else turbo_logprobs(model, tok, seqs, config), seqs,
                              lambda axis, mode, **f: _row(em, dtype, axis, mode, **f),
                              lambda cfg: turbo_logprobs(model, tok, seqs, cfg))
        bar.update(1)
    return rows


def _metric_fields(m: dict) -> dict:
    return {k: m[k] for k in ("num_sequences", "exact_match", "token_match", "num_divergences", "num_near_ties",
                              "num_unexplained", "first_divergence")}
