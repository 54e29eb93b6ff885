"""The axes of ``hf-turbo eval``: each one way of running the same prompts through hf_turbo.

An axis is a function ``(target, params) -> AxisResult`` registered in :data:`AXES` under its run
name; it returns each prompt's new token ids, the engine's stats and whether the axis really
exercised what it is about (preemptions happened, prefix-cache hits happened, ...). It raises
:class:`AxisSkipped` when it cannot run here. The ``--axes`` flags name groups of runs
(:data:`AXIS_FLAGS`): ``prefix_cache`` runs ``prefix_cold`` and ``prefix_warm``, ``speculative``
runs ``spec_draft`` and ``spec_ngram``; ``sampling``, ``teacher_forced`` and ``kv_quant`` (opt-in, informational:
what an 8-bit KV cache costs) are modes, not runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hf_turbo
from hf_turbo.config import TurboConfig
from hf_turbo.sampling import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AXES", "AXIS_FLAGS", "ALL_FLAGS", "GREEDY_ONLY", "AxisResult", "AxisSkipped", "EvalTarget",
           "runs_for_flags", "blocks_for", "CHUNK_TOKENS", "NUM_SPEC_TOKENS"]

CHUNK_TOKENS = 8  # step budget of the chunked-prefill axis: every prompt longer than this is chunked
PREEMPT_BLOCK_SIZE = 4
PREFIX_BLOCK_SIZE = 8
NUM_SPEC_TOKENS = 4
ASYNC_TIMEOUT_S = 600.0


class AxisSkipped(Exception):
    """The axis cannot run here (a feature not built, no draft model): reported, never passed."""


@dataclass
class EvalTarget:
    """What every axis runs on: one model in one dtype and the encoded prompts."""

    model: Any
    tokenizer: Any
    prompts: list[list[int]]
    max_new_tokens: int
    config: TurboConfig  # base config: a KV pool sized for all prompts, debug checks on
    pad_token_id: int
    eos_ids: tuple[int, ...]
    draft_loader: Callable[[], Any] | None = None  # returns the draft model, or None if there is none
    _draft: Any = field(default=None, repr=False)

    def draft(self) -> Any:
        if self._draft is None and self.draft_loader is not None:
            self._draft = self.draft_loader()
        return self._draft


@dataclass
class AxisResult:
    outputs: list[list[int]]
    stats: dict = field(default_factory=dict)
    exercised: bool = True
    note: str = ""


def blocks_for(prompts: list[list[int]], max_new_tokens: int, block_size: int, slack: int = 2) -> int:
    """KV blocks for every prompt at once, ``slack`` times over (room for lookahead and caching)."""
    need = sum(math.ceil((len(p) + max_new_tokens + NUM_SPEC_TOKENS + 1) / block_size) for p in prompts)
    return max(8, slack * need)


def _check_no_leak(engine) -> None:
    pool = engine.pool
    if pool.num_free != pool.num_blocks:
        raise RuntimeError(f"KV blocks leaked: {pool.num_blocks - pool.num_free} of {pool.num_blocks} "
                           "still in use after every request finished")


def _drive(engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """Run requests to completion with a step bound, so a scheduling bug fails instead of hanging."""
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    bound = 20 * (sum(map(len, prompts)) + sum(sp.max_new_tokens for sp in params)) + 100
    done: dict[str, list[int]] = {}
    steps = 0
    while len(done) < len(rids):
        if steps >= bound:
            raise RuntimeError(f"engine made no progress: {len(rids) - len(done)} requests unfinished "
                               f"after {steps} steps")
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.token_ids)
        steps += 1
    _check_no_leak(engine)
    return [done[r] for r in rids]


def _engine(t: EvalTarget, **overrides) -> hf_turbo.Engine:
    return hf_turbo.Engine(t.model, t.tokenizer, t.config.replace(**overrides) if overrides else t.config)


def _trim(row: list[int], eos_ids: tuple[int, ...]) -> list[int]:
    """New tokens of one row of a padded batch: up to and including the first EOS."""
    for i, tok in enumerate(row):
        if tok in eos_ids:
            return row[: i + 1]
    return row


# -- the axes ---------------------------------------------------------------------------------------
def axis_generate(t: EvalTarget, params: list[SamplingParams]) -> AxisResult:
    """The one-liner: ``accelerate(model)`` then one batched, left-padded ``model.generate()``."""
    from hf_turbo.eval.exactness import left_pad

    if hf_turbo.is_accelerated(t.model):
        hf_turbo.restore(t.model)
    hf_turbo.accelerate(t.model, t.config)
    ids, mask = left_pad(t.prompts, t.pad_token_id)
    seq = t.model.generate(input_ids=ids.to(t.model.device), attention_mask=mask.to(t.model.device),
                           max_new_tokens=t.max_new_tokens, do_sample=False, pad_token_id=t.pad_token_id)
    engine = hf_turbo.get_engine(t.model)
    _check_no_leak(engine)
    width = ids.shape[1]
    outs = [_trim(row[width:], t.eos_ids) for row in seq.tolist()]
    return AxisResult(outs, engine.stats(), note=f"batch={len(t.prompts)}, left-padded to {width}")


def axis_engine(t: EvalTarget, params: list[SamplingParams]) -> AxisResult:
    """All prompts as one ``Engine.generate`` batch (the default configuration)."""
    engine = _engine(t)
    outs = engine.generate(t.prompts, params, use_tqdm=False)
    _check_no_leak(engine)
    return AxisResult([list(o.token_ids) for o in outs], engine.stats())


def axis_async(t: EvalTarget, params: list[SamplingParams]) -> AxisResult:
    """``AsyncEngine`` streaming, each request arriving once the previous one streamed a token."""
    aeng = hf_turbo.AsyncEngine(t.model, t.tokenizer, t.config)
    outs: list[list[int] | None] = [None] * len(t.prompts)

    async def consume(i: int, started: asyncio.Event) -> None:
        try:
            async for delta in aeng.generate(t.prompts[i], params[i]):
                started.set()
                if delta.finished:
                    outs[i] = list(delta.output.token_ids)
        finally:
            started.set()

    async def main() -> None:
        async with aeng:
            tasks = []
            for i in range(len(t.prompts)):
                started = asyncio.Event()
                tasks.append(asyncio.create_task(consume(i, started)))
                await started.wait()  # staggered: the next one arrives mid-decode of this one
            await asyncio.gather(*tasks)

    asyncio.run(asyncio.wait_for(main(), ASYNC_TIMEOUT_S))
    _check_no_leak(aeng.engine)
    missing = [i for i, o in enumerate(outs) if o is None]
    if missing:
        raise RuntimeError(f"AsyncEngine streams of prompts {missing} ended without a final output")
    return AxisResult(outs, aeng.engine.stats(), note="staggered arrival")


def axis_chunked(t: EvalTarget, params: list[SamplingParams]) -> AxisResult:
    """Chunked prefill: a step budget of CHUNK_TOKENS tokens."""
    engine = _engine(t, max_num_batched_tokens=CHUNK_TOKENS)
    outs = _drive(engine, t.prompts, params)
    chunked = sum(len(p) > CHUNK_TOKENS for p in t.prompts)
    return AxisResult(outs, engine.stats(), exercised=chunked > 0,
                      note=f"budget {CHUNK_TOKENS} tokens/step, {chunked} prompts chunked")


def axis_preemption(t: EvalTarget, params: list[SamplingParams]) -> AxisResult:
    """A KV pool one block larger than the biggest request: requests get preempted and recomputed."""
    bs = PREEMPT_BLOCK_SIZE
    biggest = max(math.ceil((len(p) + sp.max_new_tokens) / bs) for p, sp in zip(t.prompts, params))
    engine = _engine(t, block_size=bs, num_blocks=biggest + 1)
    outs = _drive(engine, t.prompts, params)
    stats = engine.stats()
    return AxisResult(outs, stats, exercised=stats["preemptions"] > 0,
                      note=f"{biggest + 1} blocks of {bs}, {stats['preemptions']} preemptions")


def axis_prefix_cold(t: EvalTarget, params: list[SamplingParams]) -> AxisResult:
    """Prefix caching off: every prompt computed from scratch."""
    engine = _engine(t, enable_prefix_caching=False)
    return AxisResult(_drive(engine, t.prompts, params), engine.stats(), note="prefix caching off")


def axis_prefix_warm(t: EvalTarget, params: list[SamplingParams]) -> AxisResult:
    """Prefix caching on: one pass fills the cache, a second pass reads every full prefix block."""
    bs = PREFIX_BLOCK_SIZE
    engine = _engine(t, block_size=bs, num_blocks=blocks_for(t.prompts, t.max_new_tokens, bs, slack=3),
                     enable_prefix_caching=True)
    _drive(engine, t.prompts, params)
    before = engine.stats()["prefix_cache_hits"]
    outs = _drive(engine, t.prompts, params)
    stats = engine.stats()
    hits = stats["prefix_cache_hits"] - before
    return AxisResult(outs, stats, exercised=hits > 0, note=f"warm pass: {hits} cached blocks reused")


def _speculative_config(t: EvalTarget, method: str) -> TurboConfig:
    """``t.config`` with speculative decoding, or AxisSkipped when hf_turbo does not have it yet."""
    spec_cls = None
    for module in ("hf_turbo.config", "hf_turbo.engine.spec"):
        try:
            spec_cls = importlib.import_module(module).SpeculativeConfig
            break
        except (ImportError, AttributeError):
            continue
    fields = {f.name for f in dataclasses.fields(TurboConfig)}
    if spec_cls is None or "speculative" not in fields:
        raise AxisSkipped("not available (no SpeculativeConfig / TurboConfig.speculative)")
    kwargs: dict[str, Any] = {"method": method, "num_tokens": NUM_SPEC_TOKENS}
    spec_fields = {f.name for f in dataclasses.fields(spec_cls)} if dataclasses.is_dataclass(spec_cls) else set()
    if "adaptive" in spec_fields:
        kwargs["adaptive"] = False  # propose on every step, however low the acceptance: verify as much as possible
    if method == "draft":
        draft = t.draft()
        if draft is None:
            raise AxisSkipped("no draft model (pass --draft-model PATH)")
        kwargs["draft_model"] = draft
    return dataclasses.replace(t.config, speculative=spec_cls(**kwargs))


def _spec_stats(stats: dict) -> str:
    keys = [k for k in stats if any(w in k for w in ("spec", "accept", "draft"))]
    return ", ".join(f"{k}={stats[k]:.3g}" if isinstance(stats[k], float) else f"{k}={stats[k]}" for k in keys)


def _axis_spec(method: str) -> Callable[[EvalTarget, list[SamplingParams]], AxisResult]:
    def run(t: EvalTarget, params: list[SamplingParams]) -> AxisResult:
        cfg = _speculative_config(t, method)
        engine = hf_turbo.Engine(t.model, t.tokenizer, cfg)
        outs = _drive(engine, t.prompts, params)
        stats = engine.stats()
        proposed = stats.get("spec_proposed")
        return AxisResult(outs, stats, exercised=proposed is None or proposed > 0,
                          note=f"{method}, k={NUM_SPEC_TOKENS}; {_spec_stats(stats)}".rstrip("; "))

    run.__doc__ = f"Speculative decoding ({method}), {NUM_SPEC_TOKENS} proposed tokens a step."
    run.__name__ = f"axis_spec_{method}"
    return run


AXES: dict[str, Callable[[EvalTarget, list[SamplingParams]], AxisResult]] = {
    "generate": axis_generate,
    "engine": axis_engine,
    "async": axis_async,
    "chunked": axis_chunked,
    "preemption": axis_preemption,
    "prefix_cold": axis_prefix_cold,
    "prefix_warm": axis_prefix_warm,
    "spec_draft": _axis_spec("draft"),
    "spec_ngram": _axis_spec("ngram"),
}
GREEDY_ONLY = frozenset({"generate"})  # HF generate() has no per-row seed: no seeded-sampling run
AXIS_FLAGS: dict[str, tuple[str, ...]] = {
    "generate": ("generate",),
    "engine": ("engine",),
    "async": ("async",),
    "chunked": ("chunked",),
    "preemption": ("preemption",),
    "prefix_cache": ("prefix_cold", "prefix_warm"),
    "speculative": ("spec_draft", "spec_ngram"),
    "spec_draft": ("spec_draft",),
    "spec_ngram": ("spec_ngram",),
    "sampling": (),
    "teacher_forced": (),
    "kv_quant": (),  # informational rows, not in ALL_FLAGS: hf_turbo/eval/kv_quant.py
}
ALL_FLAGS = ("generate", "engine", "async", "chunked", "preemption", "prefix_cache", "speculative", "sampling",
             "teacher_forced")


def runs_for_flags(flags: tuple[str, ...]) -> list[str]:
    """Run names, in :data:`AXES` order, for ``--axes`` flags (ValueError naming an unknown flag)."""
    unknown = [f for f in flags if f not in AXIS_FLAGS]
    if unknown:
        raise ValueError(f"unknown axis {unknown[0]!r}; choose from {', '.join(AXIS_FLAGS)}")
    wanted = {r for f in flags for r in AXIS_FLAGS[f]}
    return [r for r in AXES if r in wanted]


def timed(fn: Callable[[], AxisResult]) -> tuple[AxisResult, float]:
    start = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - start
