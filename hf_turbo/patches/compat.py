"""Every difference between the supported transformers versions (5.17 .. newest), in one place."""

from __future__ import annotations

import functools

import transformers
from packaging.version import Version

__all__ = ["TRANSFORMERS_VERSION", "cache_kwarg_name", "cb_page_size_kwarg", "forward_cache_kwargs",
           "extra_logits_processors"]

TRANSFORMERS_VERSION = Version(transformers.__version__.split("+")[0])


@functools.cache
def cache_kwarg_name() -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` since 5.24, before that
    ``past_key_values`` (5.24 still accepts the old name with a deprecation warning)."""
    return "cache" if TRANSFORMERS_VERSION >= Version("5.24.0.dev0") else "past_key_values"


def forward_cache_kwargs(cache) -> dict:
    """``{<cache kwarg>: cache, "use_cache": True}`` for a model forward on this version."""
    return {cache_kwarg_name(): cache, "use_cache": True}


def cb_page_size_kwarg() -> str:
    """The ``ContinuousBatchingConfig`` argument for the KV page size: ``block_size`` before 5.2x
    (transformers 5.17 has no ``page_size``), ``page_size`` where it exists."""
    import inspect

    from transformers import ContinuousBatchingConfig

    params = inspect.signature(ContinuousBatchingConfig.__init__).parameters
    return "page_size" if "page_size" in params else "block_size"


def extra_logits_processors(model, gen_config, input_ids, attention_mask, user_processors) -> list:
    """transformers' logits processors for one generate() call, in stock's order, minus those the engine's
    sampler implements itself (repetition penalty, min-length EOS suppression, the warpers).

    Built by the model's own ``_get_logits_processor`` (after ``_prepare_special_tokens`` on a copy of the
    config), so they are stock's objects with stock's arguments; the user's processors are merged where
    stock merges them. Empty when the call needs nothing beyond the sampler.
    """
    import copy

    from transformers import LogitsProcessorList
    from transformers.generation import logits_process as lp

    native = (lp.RepetitionPenaltyLogitsProcessor, lp.MinLengthLogitsProcessor, lp.MinNewTokensLengthLogitsProcessor,
              lp.TemperatureLogitsWarper, lp.TopKLogitsWarper, lp.TopPLogitsWarper, lp.MinPLogitsWarper)
    gc = copy.deepcopy(gen_config)
    model._prepare_special_tokens(gc, True, device=input_ids.device)
    if gc.max_new_tokens is not None:  # as stock's _prepare_generated_length sets it (forced EOS reads it)
        gc.max_length = gc.max_new_tokens + input_ids.shape[1]
    user = LogitsProcessorList(user_processors or [])
    procs = model._get_logits_processor(generation_config=gc, input_ids_seq_length=input_ids.shape[1],
                                        encoder_input_ids=input_ids, prefix_allowed_tokens_fn=None,
                                        logits_processor=user, device=input_ids.device,
                                        model_kwargs={"attention_mask": attention_mask})
    return [p for p in procs if not (type(p) in native and not any(p is u for u in user))]
