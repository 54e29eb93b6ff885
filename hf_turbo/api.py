"""``accelerate(model)`` / ``restore(model)``: the one-liner, and its exact undo.

What ``accelerate`` changes, all listed here and all undone by ``restore``:
1. the model's attention implementation (config ``_attn_implementation`` of the model and its
   sub-configs) becomes "hf_turbo" (``engine/attach.py``, after the probe);
2. ``model.generate`` becomes an instance attribute wrapping the class's generate;
3. ``model._hf_turbo`` holds the state (original attention, config, the lazily built Engine);
4. ``TextGenerationPipeline.get_iterator`` is wrapped (class level, while any model is accelerated)
   so a pipeline over an accelerated model runs a list of inputs as one engine batch; it passes
   through for other models and is unwrapped when the last accelerated model is restored.
No parameter, buffer or module is touched, so ``state_dict`` never changes.
"""

from __future__ import annotations

import logging

import torch

from hf_turbo.config import TurboConfig
from hf_turbo.engine.attach import attach, detach, state_of
from hf_turbo.engine.engine import Engine
from hf_turbo.engine.lean import LeanForward
from hf_turbo.integrations.generate import make_generate
from hf_turbo.integrations.pipeline import install as install_pipeline_patch
from hf_turbo.integrations.pipeline import uninstall as uninstall_pipeline_patch
from hf_turbo.loading import load_model_and_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["accelerate", "restore", "is_accelerated", "get_engine", "pipeline"]


def is_accelerated(model) -> bool:
    """Whether ``accelerate`` has patched ``model`` (its ``generate`` runs on hf_turbo)."""
    state = state_of(model)
    return state is not None and state.generate_installed


def accelerate(model, config: TurboConfig | None = None, *, probe: bool = True, **overrides):
    """Patch a stock transformers decoder in place to run on hf_turbo; returns the same model.

    After it, ``model.generate(...)`` returns the same tokens as stock generate (greedy, fp32)
    from a paged-KV continuous-batching engine. Calling it twice is a no-op. Keyword
    ``overrides`` replace :class:`TurboConfig` fields (``max_num_batched_tokens=...``,
    ``num_blocks=...``, ``block_size=...``). ``kv_dtype="int8"`` (or ``"fp8_e4m3"``, ``"fp8_e5m2"``)
    opts into an 8-bit KV cache, which is outside that promise: its tokens may differ from stock's
    (``CacheConfig``; ``hf-turbo eval --axes kv_quant`` measures by how much).

    ``probe`` (default True): before anything is patched, run the model stock and as the engine
    runs it on two short prompts and one decode step (:mod:`hf_turbo.engine.probe`; about the
    cost of generating 6 tokens) and refuse a model whose logits differ. Turn it off only for a
    model already checked in this configuration.

    Raises:
        ValueError: the model is not a decoder-only causal LM on transformers' attention interface,
            or the probe found that the engine's packed forward does not reproduce its logits.
    """
    if is_accelerated(model):
        return model
    cfg = (config or TurboConfig()).replace(**overrides) if overrides else (config or TurboConfig())
    if cfg.cache.sliding_release is None:  # generate() returns and continues HF caches: every position is kept
        cfg = cfg.replace(sliding_release=False)
    state = attach(model, cfg, probe=probe)
    if state.had_generate_attr:
        state.extras["generate"] = model.__dict__["generate"]
    model.generate = make_generate(model, get_engine)
    install_pipeline_patch(model)
    state.generate_installed = True
    path = LeanForward.describe(model) if cfg.lean_forward else \
        "the model's own forward (TurboConfig.lean_forward=False)"
    logger.info("hf_turbo: accelerated %s; each step runs %s", type(model).__name__, path)
    return model


def restore(model):
    """Undo :func:`accelerate` exactly; returns the model. ValueError if it is not accelerated."""
    state = state_of(model)
    if state is None:
        raise ValueError(f"model {type(model).__name__} is not accelerated by hf_turbo: nothing to restore")
    if state.generate_installed:
        del model.generate
        if state.had_generate_attr:
            model.generate = state.extras["generate"]
        uninstall_pipeline_patch(model)
    # engines give a draft model (speculative decoding) its own attention back
    for engine in [state.engine, *state.extras.pop("spec_engines", {}).values()]:
        if engine is not None:
            engine.close()
    state.engine = None
    detach(model)
    return model


def get_engine(model) -> Engine:
    """The accelerated model's Engine (built on first use)."""
    state = state_of(model)
    if state is None:
        raise ValueError("model is not accelerated: call hf_turbo.accelerate(model) first")
    if state.engine is None:
        state.engine = Engine(model, None, state.config)
    return state.engine


def pipeline(task: str = "text-generation", model=None, tokenizer=None, *, turbo_config=None,
             dtype: str | torch.dtype = "float32", device: str | None = None, trust_remote_code: bool = False,
             **kwargs):
    """``transformers.pipeline`` over an accelerated model: lists run as one continuous batch.

    ``model`` is a loaded causal LM (accelerated in place) or a path / hub id / ``"fixture"`` that is
    loaded first (safetensors only; ``dtype``, ``device`` and ``trust_remote_code`` apply then).
    ``turbo_config`` is a :class:`~hf_turbo.TurboConfig` for :func:`hf_turbo.accelerate`; other
    keyword arguments go to ``transformers.pipeline``.
    """
    import transformers

    if task != "text-generation":
        raise ValueError(f"task must be 'text-generation' (hf_turbo accelerates causal LMs), got {task!r}")
    if model is None:
        raise ValueError("model is required: a loaded causal LM, a local path, a hub id or 'fixture'")
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        model, loaded_tok = load_model_and_tokenizer(str(model), dtype=dtype, device=device,
                                                     trust_remote_code=trust_remote_code)
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
    accelerate(model, turbo_config)
    return transformers.pipeline(task, model=model, tokenizer=tokenizer, **kwargs)
