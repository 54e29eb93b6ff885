"""hf_turbo's own paths for ``hf-turbo bench``, measured beside HF's in the same run.

Each path accelerates the shared model on entry and restores it on exit, so the HF paths always
run stock; the engine (and its prefix cache) is built fresh per run, before the clock starts.
"""

from __future__ import annotations

import functools
from time import perf_counter

import hf_turbo
from hf_turbo.bench.paths import BenchContext, PathResult, PathUnavailable, _bar, register_path
from hf_turbo.bench.workloads import Workload
from hf_turbo.config import SpeculativeConfig
from hf_turbo.sampling import SamplingParams

__all__ = ["turbo_sequential", "turbo_padded", "turbo_engine", "turbo_engine_no_prefix_cache", "turbo_spec_draft",
           "turbo_spec_ngram", "spec_engine_run"]

SPEC_TOKENS = 4  # k of the speculative paths (the adaptive k stays at or below it)


def turbo_sequential(ctx: BenchContext, workload: Workload) -> PathResult:
    """Accelerated ``model.generate()`` one request at a time (batch-1 latency)."""
    import torch

    hf_turbo.accelerate(ctx.model)
    try:
        hf_turbo.get_engine(ctx.model)
        outputs, processed = [], 0
        with _bar(ctx, workload.n_requests, f"{workload.name} turbo_sequential") as bar:
            start = perf_counter()
            for prompt, n in zip(workload.prompts, workload.output_lens, strict=True):
                ids = torch.tensor([prompt], dtype=torch.long, device=ctx.device)
                out = ctx.model.generate(ids, generation_config=ctx.decode_config(n))
                outputs.append(out[0, len(prompt):].tolist())
                processed += len(prompt) + n
                bar.update(1)
            ctx.synchronize()
            seconds = perf_counter() - start
    finally:
        hf_turbo.restore(ctx.model)
    return PathResult(outputs, seconds, processed)


def turbo_padded(ctx: BenchContext, workload: Workload) -> PathResult:
    """Accelerated ``model.generate()`` on the same left-padded batches as ``hf_padded``."""
    from hf_turbo.bench.paths import hf_padded

    hf_turbo.accelerate(ctx.model)
    try:
        hf_turbo.get_engine(ctx.model)
        result = hf_padded(ctx, workload)
    finally:
        hf_turbo.restore(ctx.model)
    # padding is not computed by the engine: only real tokens are processed
    result.tokens_processed = sum(len(p) for p in workload.prompts) + sum(workload.output_lens)
    return result


def _engine_run(ctx: BenchContext, workload: Workload, prefix_caching: bool,
                speculative: SpeculativeConfig | None = None) -> PathResult:
    model = ctx.model
    hf_turbo.accelerate(model, enable_prefix_caching=prefix_caching, speculative=speculative)
    timer = _SamplerTimer(ctx)
    try:
        engine = hf_turbo.get_engine(model)
        params = [SamplingParams(max_new_tokens=n, min_new_tokens=n, ignore_eos=True, seed=ctx.seed * 100_003 + i,
                                 **(ctx.sampling or {})) for i, n in enumerate(workload.output_lens)]
        with timer:
            start = perf_counter()
            outs = engine.generate([list(p) for p in workload.prompts], params, use_tqdm=ctx.progress)
            ctx.synchronize()
            seconds = perf_counter() - start
        stats = engine.stats()
    finally:
        hf_turbo.restore(model)  # closes the engine: a draft model gets its own attention back
    cached = sum(o.num_cached_tokens for o in outs)
    processed = sum(len(p) for p in workload.prompts) + sum(workload.output_lens) - cached
    extra = {"steps": stats["steps"], "preemptions": stats["preemptions"], "cached_prompt_tokens": cached,
             "prefix_cache_hit_rate": stats["prefix_cache_hit_rate"], "sampler_s": timer.seconds,
             "sampler_share": timer.seconds / seconds if seconds > 0 else None}
    if speculative is not None:
        extra.update({k: stats[k] for k in ("spec_proposed", "spec_accepted", "acceptance_rate",
                                             "mean_accepted_per_step", "spec_verify_steps",
                                             "spec_position_acceptance")},
                     spec_method=speculative.method, spec_k=speculative.num_tokens, spec_adaptive=speculative.adaptive)
    return PathResult([o.token_ids for o in outs], seconds, processed, extra=extra)


class _SamplerTimer:
    """Times the engine's calls of the sampler (device synchronized), to report its share of the run."""

    def __init__(self, ctx: BenchContext) -> None:
        self.ctx = ctx
        self.seconds = 0.0
        self._saved = None

    def __enter__(self) -> _SamplerTimer:
        from hf_turbo.engine import engine as engine_module

        self._saved = inner = engine_module.sample

        def timed(*args, **kwargs):
            self.ctx.synchronize()
            start = perf_counter()
            out = inner(*args, **kwargs)
            self.ctx.synchronize()
            self.seconds += perf_counter() - start
            return out

        engine_module.sample = timed
        return self

    def __exit__(self, *exc) -> None:
        from hf_turbo.engine import engine as engine_module

        engine_module.sample = self._saved


def turbo_engine(ctx: BenchContext, workload: Workload) -> PathResult:
    """``hf_turbo.Engine.generate`` over all requests: continuous batching, prefix caching on."""
    return _engine_run(ctx, workload, prefix_caching=True)


def turbo_engine_no_prefix_cache(ctx: BenchContext, workload: Workload) -> PathResult:
    """The same engine with prefix caching off (W3's comparison)."""
    return _engine_run(ctx, workload, prefix_caching=False)


def spec_engine_run(ctx: BenchContext, workload: Workload, method: str, k: int = SPEC_TOKENS,
                    adaptive: bool = True) -> PathResult:
    """The engine with speculative decoding; ``extra`` carries its acceptance figures."""
    draft = _fixture_draft(ctx) if method == "draft" else None
    spec = SpeculativeConfig(method, draft_model=draft, num_tokens=k, adaptive=adaptive)
    return _engine_run(ctx, workload, prefix_caching=True, speculative=spec)


@functools.cache
def _load_draft(device, dtype):
    from transformers import AutoModelForCausalLM

    from hf_turbo.testing import fixture_path

    return AutoModelForCausalLM.from_pretrained(fixture_path("draft"), dtype=dtype).to(device).eval()


def _fixture_draft(ctx: BenchContext):
    draft = _load_draft(ctx.device, ctx.dtype)
    vocab, target_vocab = draft.config.vocab_size, ctx.model.get_output_embeddings().weight.shape[0]
    if vocab != target_vocab:
        raise PathUnavailable(f"the fixture draft's vocabulary ({vocab}) is not the model's ({target_vocab})")
    return draft


def turbo_spec_draft(ctx: BenchContext, workload: Workload) -> PathResult:
    """The engine with the fixture draft model proposing (k <= 4, adaptive)."""
    return spec_engine_run(ctx, workload, "draft")


def turbo_spec_ngram(ctx: BenchContext, workload: Workload) -> PathResult:
    """The engine with n-gram prompt lookup proposing (k <= 4, adaptive)."""
    return spec_engine_run(ctx, workload, "ngram")


register_path("turbo_sequential", turbo_sequential)
register_path("turbo_padded", turbo_padded)
register_path("turbo_engine", turbo_engine)
register_path("turbo_engine_nopc", turbo_engine_no_prefix_cache)
register_path("turbo_spec_draft", turbo_spec_draft)
register_path("turbo_spec_ngram", turbo_spec_ngram)
