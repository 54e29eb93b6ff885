"""Generation paths the benchmark compares, and the registry that later paths join.

A path is a function ``fn(ctx: BenchContext, workload: Workload) -> PathResult`` that generates
exactly ``workload.output_lens[i]`` new tokens for every request ``i`` (greedy, or ``ctx.sampling``) and
times itself with ``time.perf_counter``. The runner calls it once on ``workload.warmup()`` untimed first. A path that
cannot run here raises ``PathUnavailable(reason)``; the report lists it as unavailable.

Add one with ``register_path("name", fn)``; ``baseline=True`` marks the path other paths' speed is
divided by (``hf_sequential``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from hf_turbo.bench.workloads import Workload
from hf_turbo.patches.compat import cb_page_size_kwarg

__all__ = [
    "BenchContext",
    "BenchPath",
    "PATHS",
    "PathResult",
    "PathUnavailable",
    "baseline_path",
    "register_path",
]

logger = logging.getLogger(__name__)


class PathUnavailable(RuntimeError):
    """Raised by a path that cannot run on this machine / transformers version; the message says why."""


@dataclass(frozen=True)
class BenchContext:
    """What every path gets: the one model and tokenizer all paths share, and run settings.

    Attributes:
        model: the loaded ``AutoModelForCausalLM`` (eval mode, on ``device``, in ``dtype``).
        tokenizer: its tokenizer.
        device: where the model runs.
        dtype: the model's dtype.
        seed: the benchmark seed.
        max_batch: most requests a batched path may put into one ``generate()`` call.
        progress: show tqdm bars (on stderr).
        sampling: ``None`` for greedy, else ``{"temperature": T, "top_p": P, "top_k": K}`` (every path
            samples with it; seeded per request where the path takes seeds).
    """

    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    seed: int = 0
    max_batch: int = 64
    progress: bool = True
    sampling: dict[str, float] | None = None

    @property
    def pad_token_id(self) -> int:
        for value in (
            self.model.generation_config.pad_token_id,
            self.model.config.pad_token_id,
            self.tokenizer.pad_token_id,
        ):
            if isinstance(value, int):
                return value
        eos = self.eos_token_id
        return eos if eos is not None else 0

    @property
    def eos_token_id(self) -> int | list[int] | None:
        eos = self.model.generation_config.eos_token_id
        return eos if eos is not None else self.model.config.eos_token_id

    def decode_config(self, max_new_tokens: int) -> GenerationConfig:
        """Greedy (or the run's sampling) config that generates exactly ``max_new_tokens`` (EOS suppressed
        until then)."""
        sampling = {"do_sample": False} if self.sampling is None else {"do_sample": True, **self.sampling}
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            **sampling,
        )

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class PathResult:
    """What one timed run of a path returns.

    Attributes:
        outputs: per request (workload order), the new token ids generated for it, cut at its
            requested length when the path decoded more (padded batches); their lengths are the
            "tokens generated" the report checks against the requested output lengths.
        seconds: wall time of the timed part (``perf_counter``, device synchronized).
        tokens_processed: tokens run through the model (prompts incl. padding + every decoded token),
            used for the FLOP estimate.
        wasted_tokens: tokens decoded beyond the requests' lengths and discarded.
        extra: path-specific numbers for the JSON (setup time, batch count, cache sizes).
    """

    outputs: list[list[int]]
    seconds: float
    tokens_processed: int
    wasted_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


PathFn = Callable[[BenchContext, Workload], PathResult]


@dataclass(frozen=True)
class BenchPath:
    """A registered path: its name, function, and whether it is the speed baseline."""

    name: str
    fn: PathFn
    baseline: bool = False


PATHS: dict[str, BenchPath] = {}


def register_path(name: str, fn: PathFn, *, baseline: bool = False) -> BenchPath:
    """Register ``fn(ctx, workload) -> PathResult`` under ``name`` (replacing a path of that name).

    At most one path is the baseline; registering a new baseline clears the flag on the old one.
    """
    if not name or "," in name:
        raise ValueError(f"path name must be non-empty and without commas, got {name!r}")
    if baseline:
        for other in list(PATHS.values()):
            if other.baseline and other.name != name:
                PATHS[other.name] = BenchPath(other.name, other.fn, baseline=False)
    path = BenchPath(name, fn, baseline)
    PATHS[name] = path
    return path


def baseline_path() -> str | None:
    """Name of the registered baseline path, if any."""
    return next((p.name for p in PATHS.values() if p.baseline), None)


def _bar(ctx: BenchContext, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="req", leave=False, disable=not ctx.progress)


def hf_sequential(ctx: BenchContext, workload: Workload) -> PathResult:
    """Stock ``model.generate()``, one request at a time."""
    outputs: list[list[int]] = []
    processed = 0
    with _bar(ctx, workload.n_requests, f"{workload.name} hf_sequential") as bar:
        start = perf_counter()
        for prompt, n in zip(workload.prompts, workload.output_lens, strict=True):
            ids = torch.tensor([prompt], dtype=torch.long, device=ctx.device)
            config = ctx.decode_config(n)
            out = ctx.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
            outputs.append(out[0, len(prompt) :].tolist())
            processed += len(prompt) + n
            bar.update(1)
        ctx.synchronize()
        seconds = perf_counter() - start
    return PathResult(outputs, seconds, processed)


def hf_padded(ctx: BenchContext, workload: Workload) -> PathResult:
    """Stock ``model.generate()`` on left-padded batches of up to ``ctx.max_batch`` requests, in order.

    Each batch decodes max(its output lengths) tokens for every row; only each request's own length
    counts, the rest is ``wasted_tokens``. Padding positions are counted in ``tokens_processed``.
    """
    outputs: list[list[int]] = []
    processed = wasted = n_batches = 0
    pad = ctx.pad_token_id
    with _bar(ctx, workload.n_requests, f"{workload.name} hf_padded") as bar:
        start = perf_counter()
        for lo in range(0, workload.n_requests, ctx.max_batch):
            prompts = workload.prompts[lo : lo + ctx.max_batch]
            targets = workload.output_lens[lo : lo + ctx.max_batch]
            width, max_out = max(len(p) for p in prompts), max(targets)
            # input_ids, attention_mask: [B, width], prompts right-aligned (left padding)
            ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for row, prompt in enumerate(prompts):
                ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
                mask[row, width - len(prompt) :] = 1
            config = ctx.decode_config(max_out)
            out = ctx.model.generate(
                ids.to(ctx.device), attention_mask=mask.to(ctx.device), generation_config=config
            )
            new = out[:, width:].tolist()
            for row, target in zip(new, targets, strict=True):
                outputs.append(row[:target])
                wasted += max(len(row) - target, 0)
            processed += len(prompts) * (width + max_out)
            n_batches += 1
            bar.update(len(prompts))
        ctx.synchronize()
        seconds = perf_counter() - start
    extra = {"n_batches": n_batches, "max_batch": ctx.max_batch}
    return PathResult(outputs, seconds, processed, wasted_tokens=wasted, extra=extra)


def _cb_config(ctx: BenchContext, workload: Workload) -> Any:
    """Continuous-batching config; on CPU the KV cache is sized to the workload instead of to free memory."""
    from transformers import ContinuousBatchingConfig

    max_requests = min(workload.n_requests, ctx.max_batch)
    if ctx.device.type == "cuda":
        return ContinuousBatchingConfig(max_requests_per_batch=max_requests, seed=ctx.seed)
    page = 64
    pairs = zip(workload.prompts, workload.output_lens, strict=True)
    blocks = sum(math.ceil((len(p) + n) / page) for p, n in pairs)
    return ContinuousBatchingConfig(
        **{cb_page_size_kwarg(): page},
        num_blocks=blocks + workload.n_requests,
        max_batch_tokens=512,
        max_requests_per_batch=max_requests,
        use_cuda_graph=False,
        use_async_batching=False,
        seed=ctx.seed,
    )


def hf_cb(ctx: BenchContext, workload: Workload) -> PathResult:
    """transformers' own continuous batching (the manager behind ``model.generate_batch``).

    Requests go in with their own ``max_new_tokens`` and ``eos_token_id=-1`` (EOS off), so each
    generates exactly its length. Timed: from submitting the requests to the last result; manager
    start-up (cache allocation) is reported as ``extra["setup_s"]``.
    """
    model = ctx.model
    has_cb = hasattr(model, "generate_batch") and hasattr(model, "continuous_batching_context_manager")
    if not has_cb:
        import transformers

        raise PathUnavailable(f"transformers {transformers.__version__} has no continuous batching")
    attn_before = ctx.model.config._attn_implementation
    results: dict[str, Any] = {}
    try:
        sampling = {"do_sample": False} if ctx.sampling is None else {"do_sample": True, **ctx.sampling}
        gen_config = GenerationConfig(eos_token_id=-1, pad_token_id=ctx.pad_token_id, **sampling)
        cb_config = _cb_config(ctx, workload)
        setup_start = perf_counter()
        with (
            ctx.model.continuous_batching_context_manager(
                generation_config=gen_config, continuous_batching_config=cb_config, block=True, timeout=30
            ) as manager,
            _bar(ctx, workload.n_requests, f"{workload.name} hf_cb") as bar,
        ):
            setup_s = perf_counter() - setup_start
            start = perf_counter()
            for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens, strict=True)):
                manager.add_request(list(prompt), request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
            while len(results) < workload.n_requests:
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running():
                        raise RuntimeError("continuous batching thread stopped before all requests finished")
                    continue
                if result.error is not None:
                    raise RuntimeError(f"request {result.request_id} failed: {result.error}")
                if result.is_finished():
                    results[result.request_id] = result
                    bar.update(1)
            ctx.synchronize()
            seconds = perf_counter() - start
    except PathUnavailable:
        raise
    except Exception as exc:
        logger.debug("hf_cb failed", exc_info=True)
        reason = f"continuous batching failed on {ctx.device.type}: {type(exc).__name__}: {exc}"
        raise PathUnavailable(reason) from exc
    finally:
        if ctx.model.config._attn_implementation != attn_before:
            ctx.model.set_attn_implementation(attn_before)
    outputs = [list(results[f"r{i}"].generated_tokens) for i in range(workload.n_requests)]
    processed = workload.prompt_tokens + sum(len(o) for o in outputs)
    extra = {"setup_s": setup_s, "attn_implementation": attn_before}
    if ctx.device.type != "cuda":
        extra.update(page_size=getattr(cb_config, cb_page_size_kwarg()), num_blocks=cb_config.num_blocks)
    return PathResult(outputs, seconds, processed, extra=extra)


register_path("hf_sequential", hf_sequential, baseline=True)
register_path("hf_padded", hf_padded)
register_path("hf_cb", hf_cb)
