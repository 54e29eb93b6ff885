"""``pipeline("text-generation")`` over an accelerated model: a list of inputs is ONE engine batch.

Stock ``TextGenerationPipeline`` runs a list chunk by chunk (``batch_size`` rows per chunk, each chunk
one ``generate()`` call), so the engine would only ever see ``batch_size`` rows at a time. While a
model is accelerated, ``TextGenerationPipeline.get_iterator`` (the one seam every list input goes
through) is wrapped; for a list over an accelerated model it:

1. preprocesses and collates the chunks exactly as stock does (same tokenizer calls, chat templates,
   left padding, ``batch_size``);
2. runs stock ``_forward`` on each chunk with a stand-in ``generate`` that only records its
   arguments, so every generation argument is resolved by stock code (defaults, prefix, stop strings);
3. calls the accelerated ``model.generate`` ONCE on all rows (the engine packs them without padding);
4. replays stock ``_forward`` per chunk with a stand-in that returns that chunk's slice, laid out as
   stock's per-chunk generate would (its padding, its width), then stock postprocessing.

Anything the single call cannot reproduce exactly (a ``max_length`` budget that depends on a chunk's
padded width, ``return_dict_in_generate``, a streamer, arguments the engine does not cover, empty
prompts) runs the stock chunk-by-chunk path instead. The class patch is installed by
``hf_turbo.accelerate`` and removed by ``hf_turbo.restore`` once no accelerated model is left; it
passes through for pipelines over models that are not accelerated. Like stock pipelines, one
pipeline instance is not meant to be called from several threads at once.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from hf_turbo.engine.attach import state_of

logger = logging.getLogger(__name__)

__all__ = ["install", "uninstall", "is_installed"]

_lock = threading.Lock()
_accelerated_models: weakref.WeakSet = weakref.WeakSet()
_saved: dict[str, Any] = {}  # what the class had before the patch: {"get_iterator": fn | _MISSING}
_MISSING = object()


class _Recorded(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the recording stand-in to stop stock ``_forward`` once it has called generate."""


# -- install / uninstall ------------------------------------------------------------------------
def _pipeline_class():
    from transformers.pipelines.text_generation import TextGenerationPipeline

    return TextGenerationPipeline


def is_installed() -> bool:
    return bool(_saved)


def install(model) -> None:
    """Register an accelerated model and wrap ``TextGenerationPipeline.get_iterator`` (once)."""
    with _lock:
        _accelerated_models.add(model)
        if _saved:
            return
        try:
            cls = _pipeline_class()
        except ImportError as exc:  # pipelines unavailable in this install: generate() is still accelerated
            logger.debug("hf_turbo: transformers pipelines not importable (%s); not wrapping them", exc)
            return
        _saved["get_iterator"] = cls.__dict__.get("get_iterator", _MISSING)
        cls.get_iterator = _get_iterator
        logger.debug("hf_turbo: wrapped TextGenerationPipeline.get_iterator")


def uninstall(model) -> None:
    """Unregister ``model``; unwrap the class when no accelerated model is left."""
    with _lock:
        _accelerated_models.discard(model)
        if not _saved or len(_accelerated_models):
            return
        cls = _pipeline_class()
        original = _saved.pop("get_iterator")
        if original is _MISSING:
            del cls.get_iterator
        else:
            cls.get_iterator = original
        logger.debug("hf_turbo: restored TextGenerationPipeline.get_iterator")


# -- the wrapped get_iterator -------------------------------------------------------------------
def _stock_get_iterator(pipe):
    original = _saved.get("get_iterator", _MISSING)
    if original is _MISSING or original is None:
        return super(_pipeline_class(), pipe).get_iterator
    return original.__get__(pipe)


def _get_iterator(self, inputs, num_workers: int, batch_size: int, preprocess_params, forward_params,
                  postprocess_params):
    stock = _stock_get_iterator(self)
    cls = _pipeline_class()
    state = state_of(self.model)
    if not (isinstance(inputs, list) and inputs and state is not None and state.generate_installed
            and type(self)._forward is cls._forward):
        return stock(inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params)
    return iter(_run_one_batch(self, inputs, num_workers, batch_size, preprocess_params, forward_params,
                               postprocess_params))


class _GenerateProxy:
    """Stands in for ``pipe.model`` during ``_forward``: ``generate`` is replaced, the rest delegates."""

    def __init__(self, model, generate) -> None:
        self._model = model
        self.generate = generate

    def __getattr__(self, name: str):
        return getattr(self._model, name)


class _swap_model:
    """Temporarily give ``pipe`` a model whose ``generate`` is ``fn`` (the pipeline instance only)."""

    def __init__(self, pipe, fn) -> None:
        self.pipe, self.fn = pipe, fn

    def __enter__(self):
        self.model = self.pipe.model
        self.pipe.model = _GenerateProxy(self.model, self.fn)

    def __exit__(self, *exc) -> bool:
        self.pipe.model = self.model
        return False


def _run_one_batch(pipe, inputs: list, num_workers: int, batch_size: int, preprocess_params, forward_params,
                   postprocess_params) -> list:
    from torch.utils.data import DataLoader
    from transformers.pipelines.base import no_collate_fn, pad_collate_fn
    from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

    # 1. preprocess + collate exactly as stock get_iterator does
    feature_extractor = pipe.feature_extractor if pipe.feature_extractor is not None else pipe.image_processor
    collate_fn = no_collate_fn if batch_size == 1 else pad_collate_fn(pipe.tokenizer, feature_extractor)
    dataset = PipelineDataset(inputs, pipe.preprocess, preprocess_params)
    chunks = list(DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=collate_fn))

    # 2. record the generate() call stock _forward makes for each chunk
    calls = [_record_call(pipe, chunk, forward_params) for chunk in chunks]
    model = pipe.model
    plan = _plan(model, calls)
    if plan is None:
        forward = pipe.forward
    else:
        # 3. one engine batch for every row of every chunk
        outputs = _generate_all(model, pipe.tokenizer, calls, plan)
        replay = iter(zip(calls, outputs))

        def forward(chunk, **params):
            (ids, _, _), out = next(replay)

            def replay_generate(input_ids=None, **_kw):
                if input_ids is None or not torch.equal(input_ids.cpu(), ids.cpu()):
                    raise RuntimeError("hf_turbo pipeline replay: chunk inputs changed between passes")
                return out

            with _swap_model(pipe, replay_generate):
                return pipe.forward(chunk, **params)

    # 4. stock unbatching and postprocessing
    model_iterator = PipelineIterator(chunks, forward, forward_params, loader_batch_size=batch_size)
    return list(PipelineIterator(model_iterator, pipe.postprocess, postprocess_params))


def _record_call(pipe, chunk, forward_params) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
    """(input_ids, attention_mask, generate kwargs) that stock ``_forward`` passes for ``chunk``."""
    seen: list = []

    def record(input_ids=None, attention_mask=None, **kwargs):
        seen.append((input_ids, attention_mask, kwargs))
        raise _Recorded

    with _swap_model(pipe, record):
        try:
            pipe.forward(dict(chunk), **forward_params)  # _forward pops from its dict: give it a copy
        except _Recorded:
            pass
    if len(seen) != 1:
        raise RuntimeError(f"TextGenerationPipeline._forward called generate {len(seen)} times, expected 1")
    return seen[0]


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # objects without a usable __eq__: treat as different
        return False


def _plan(model, calls: Sequence[tuple]):
    """The resolved GenerationConfig if one engine call reproduces every chunk's stock call, else None."""
    from hf_turbo.integrations.generate import per_row_processor_reason, unsupported_reason

    kwargs = calls[0][2]
    for ids, _, kw in calls:
        if ids is None or ids.dim() != 2 or kw.keys() != kwargs.keys() \
                or not all(_same(kw[k], kwargs[k]) for k in kwargs):
            return None
    if kwargs.get("streamer") is not None:
        return None
    gen_kwargs = {k: v for k, v in kwargs.items() if k not in ("generation_config", "tokenizer")}
    gc, model_kwargs = model._prepare_generation_config(kwargs.get("generation_config"), **gen_kwargs)
    for name, value in model_kwargs.items():
        if value is None or name == "use_model_defaults":
            continue
        if name in ("logits_processor", "stopping_criteria") and len(value) == 0:
            continue
        logger.info("hf_turbo pipeline: %r needs stock generate: running chunk by chunk", name)
        return None
    reason = unsupported_reason(gc) or per_row_processor_reason(gc)
    if reason is None and gc.max_new_tokens is None:
        reason = "max_length"  # the budget depends on each chunk's padded width
    if reason is None and gc.min_length:
        reason = "min_length"
    if reason is None and gc.return_dict_in_generate:
        reason = "return_dict_in_generate"
    if reason is not None:
        logger.info("hf_turbo pipeline: %r: running chunk by chunk", reason)
        return None
    return gc


def _eos_set(gc) -> set[int]:
    eos = gc.eos_token_id
    if eos is None:
        return set()
    if isinstance(eos, torch.Tensor):
        return {int(x) for x in eos.reshape(-1).tolist()}
    return {int(x) for x in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _generate_all(model, tokenizer, calls: Sequence[tuple], gc) -> list[torch.Tensor]:
    """One accelerated generate over every row; returns each chunk's output laid out as stock's."""
    rows: list[torch.Tensor] = []
    for ids, mask, _ in calls:
        for i in range(ids.shape[0]):
            rows.append(ids[i][mask[i].bool()] if mask is not None else ids[i])
    pad_in = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    width = max(len(r) for r in rows)
    device = calls[0][0].device
    input_ids = torch.full((len(rows), width), pad_in, dtype=calls[0][0].dtype, device=device)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):  # left padding; the engine drops it
        input_ids[i, width - len(r):] = r
        attention_mask[i, width - len(r):] = 1
    new = model.generate(input_ids=input_ids, attention_mask=attention_mask, **calls[0][2])[:, width:]
    lengths = _new_lengths(new.tolist(), gc)
    outputs, start = [], 0
    for ids, _, _ in calls:
        n = ids.shape[0]
        longest = max(lengths[start:start + n])
        outputs.append(torch.cat([ids, new[start:start + n, :longest].to(ids.device)], dim=1))
        start += n
    return outputs


def _new_lengths(new: list[list[int]], gc) -> list[int]:
    """How many tokens each row really generated (the rest is padding), as stock would stop it.

    A row ends at its first EOS (EOS cannot come earlier: min_new_tokens suppresses it); a row
    without EOS ran to max_new_tokens unless a stop string ended it, and then only trailing padding
    follows it.
    """
    eos = _eos_set(gc)
    pad = gc.pad_token_id if gc.pad_token_id is not None else (min(eos) if eos else 0)
    out = []
    for row in new:
        n = next((i + 1 for i, t in enumerate(row) if t in eos), None)
        if n is None:
            n = len(row)
            if gc.stop_strings:
                while n > 0 and row[n - 1] == pad:
                    n -= 1
        out.append(n)
    return out
