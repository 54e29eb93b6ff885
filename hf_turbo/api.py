"""``accelerate(model)`` / ``restore(model)``: the one-liner, and its exact undo.

What ``accelerate`` changes, all listed here and all undone by ``restore``:
1. the model's attention implementation (config ``_attn_implementation`` of the model and its
   sub-configs) becomes "hf_turbo";
2. ``model.generate`` becomes an instance attribute wrapping the class's generate;
3. ``model._hf_turbo`` holds the state (original attention, config, the lazily built Engine);
4. ``TextGenerationPipeline.get_iterator`` is wrapped (class level, while any model is accelerated)
   so a pipeline over an accelerated model runs a list of inputs as one engine batch; it passes
   through for other models and is unwrapped when the last accelerated model is restored.
No parameter, buffer or module is touched, so ``state_dict`` never changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hf_turbo.config import TurboConfig
from hf_turbo.patches.attention import ATTN_NAME, register

logger = logging.getLogger(__name__)

__all__ = ["accelerate", "restore", "is_accelerated", "get_engine"]

_STATE_ATTR = "_hf_turbo"


@dataclass
class _TurboState:
    original_attn: str | dict | None
    config: TurboConfig
    engine: object | None = None
    had_generate_attr: bool = False
    extras: dict = field(default_factory=dict)


def is_accelerated(model) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def _validate_model(model) -> None:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    cfg = model.config
    mtype = getattr(cfg, "model_type", type(model).__name__)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"model_type {mtype!r} is an encoder-decoder model; hf_turbo accelerates "
                         "decoder-only causal LMs")
    if not hasattr(model, "generate") or model.get_output_embeddings() is None:
        raise ValueError(f"model_type {mtype!r} ({type(model).__name__}) is not a causal LM with an LM head "
                         "(load it with AutoModelForCausalLM)")
    if not _uses_attention_interface(model):
        raise ValueError(f"model_type {mtype!r} does not use transformers' attention interface "
                         "(_supports_attention_backend is False), so hf_turbo cannot install its attention")


def _uses_attention_interface(model) -> bool:
    """Whether the model dispatches attention through transformers' AttentionInterface."""
    import sys

    if getattr(model, "_supports_attention_backend", False):
        return True
    module = sys.modules.get(type(model).__module__)
    return module is not None and hasattr(module, "ALL_ATTENTION_FUNCTIONS")


def _ensure_turbo_attention(model) -> None:
    """Make sure the model runs the "hf_turbo" attention (accelerating it if it is not yet)."""
    if not is_accelerated(model):
        accelerate(model)


def _check_packed_forward(model, backend: str) -> None:
    """Switch the model to the "hf_turbo" attention after the probe has shown the engine's packed paged
    forward gives the model's own logits (:mod:`hf_turbo.engine.probe`); else put the attention back
    and raise ValueError saying what differed. Costs about as much as generating 6 tokens."""
    from hf_turbo.engine.probe import probe_packed_forward

    original_attn = model.config._attn_implementation
    reason = probe_packed_forward(model, lambda: model.set_attn_implementation(ATTN_NAME), backend)
    if reason is not None:
        model.set_attn_implementation(original_attn)
        mtype = getattr(model.config, "model_type", type(model).__name__)
        raise ValueError(f"model_type {mtype!r} ({type(model).__name__}) cannot run on hf_turbo's engine exactly: "
                         f"{reason}")


def accelerate(model, config: TurboConfig | None = None, *, probe: bool = True, **overrides):
    """Patch a stock transformers decoder in place to run on hf_turbo; returns the same model.

    After it, ``model.generate(...)`` returns the same tokens as stock generate (greedy, fp32)
    from a paged-KV continuous-batching engine. Calling it twice is a no-op. Keyword
    ``overrides`` replace :class:`TurboConfig` fields (``max_num_batched_tokens=...``,
    ``num_blocks=...``, ``block_size=...``).

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
    _validate_model(model)
    register()
    cfg = (config or TurboConfig()).replace(**overrides) if overrides else (config or TurboConfig())
    from hf_turbo.patches.generate import make_generate
    from hf_turbo.patches.pipeline import install as install_pipeline_patch

    original_attn = model.config._attn_implementation
    state = _TurboState(original_attn=original_attn, config=cfg,
                        had_generate_attr="generate" in model.__dict__)
    if state.had_generate_attr:
        state.extras["generate"] = model.__dict__["generate"]
    if probe:
        _check_packed_forward(model, cfg.backend)
    else:
        model.set_attn_implementation(ATTN_NAME)
    setattr(model, _STATE_ATTR, state)
    model.generate = make_generate(model)
    install_pipeline_patch(model)
    logger.info("hf_turbo: accelerated %s (was attn_implementation=%r)", type(model).__name__, original_attn)
    return model


def restore(model):
    """Undo :func:`accelerate` exactly; returns the model. ValueError if it is not accelerated."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError(f"model {type(model).__name__} is not accelerated by hf_turbo: nothing to restore")
    from hf_turbo.patches.pipeline import uninstall as uninstall_pipeline_patch

    model.set_attn_implementation(state.original_attn)
    del model.generate
    if state.had_generate_attr:
        model.generate = state.extras["generate"]
    delattr(model, _STATE_ATTR)
    uninstall_pipeline_patch(model)
    # engines give a draft model (speculative decoding) its own attention back
    for engine in [state.engine, *state.extras.pop("spec_engines", {}).values()]:
        if engine is not None:
            engine.close()
    state.engine = None
    return model


def get_engine(model):
    """The accelerated model's Engine (built on first use)."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("model is not accelerated: call hf_turbo.accelerate(model) first")
    if state.engine is None:
        from hf_turbo.engine.engine import Engine

        state.engine = Engine(model, None, state.config)
    return state.engine
