"""Every difference between the supported transformers versions (5.17 .. newest), in one place."""

from __future__ import annotations

import functools

import transformers
from packaging.version import Version

__all__ = ["TRANSFORMERS_VERSION", "cache_kwarg_name", "cb_page_size_kwarg", "forward_cache_kwargs"]

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
