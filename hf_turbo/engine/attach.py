"""What an engine needs of a model: its attention switched to "hf_turbo" once the probe has shown the packed
paged forward gives the model's own logits, and switched back exactly.

The model's ``_hf_turbo`` attribute holds the state (the original attention, the config, the engine built
for it, what ``accelerate()`` installed on top: ``generate_installed``). ``Engine(model)`` attaches a model
that is not yet attached; ``hf_turbo.accelerate`` attaches it and installs the drop-in ``generate()``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from hf_turbo.config import TurboConfig
from hf_turbo.engine.probe import probe_packed_forward
from hf_turbo.patches.attention import ATTN_NAME, register

logger = logging.getLogger(__name__)

__all__ = ["STATE_ATTR", "TurboState", "attach", "detach", "state_of", "uses_attention_interface", "validate_model"]

STATE_ATTR = "_hf_turbo"


@dataclass
class TurboState:
    original_attn: str | dict | None
    config: TurboConfig
    engine: object | None = None
    had_generate_attr: bool = False
    generate_installed: bool = False
    extras: dict = field(default_factory=dict)


def state_of(model) -> TurboState | None:
    """The model's hf_turbo state, or None when it runs its own attention."""
    return getattr(model, STATE_ATTR, None)


def uses_attention_interface(model) -> bool:
    """Whether the model dispatches attention through transformers' AttentionInterface."""
    if getattr(model, "_supports_attention_backend", False):
        return True
    module = sys.modules.get(type(model).__module__)
    return module is not None and hasattr(module, "ALL_ATTENTION_FUNCTIONS")


def validate_model(model) -> None:
    """ValueError unless ``model`` is a decoder-only transformers causal LM on the attention interface."""
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
    if not uses_attention_interface(model):
        raise ValueError(f"model_type {mtype!r} does not use transformers' attention interface "
                         "(_supports_attention_backend is False), so hf_turbo cannot install its attention")


def _check_packed_forward(model, backend: str, windows: dict) -> None:
    """Switch the model to the "hf_turbo" attention after the probe has shown the engine's packed paged
    forward gives the model's own logits (:mod:`hf_turbo.engine.probe`); else put the attention back
    and raise ValueError saying what differed. Fills ``windows`` (cache layer -> the sliding window its
    attention ran with). Costs about as much as generating 6 tokens."""
    original_attn = model.config._attn_implementation
    reason = probe_packed_forward(model, lambda: model.set_attn_implementation(ATTN_NAME), backend, windows)
    if reason is not None:
        model.set_attn_implementation(original_attn)
        mtype = getattr(model.config, "model_type", type(model).__name__)
        raise ValueError(f"model_type {mtype!r} ({type(model).__name__}) cannot run on hf_turbo's engine exactly: "
                         f"{reason}")


def attach(model, config: TurboConfig | None = None, *, probe: bool = True) -> TurboState:
    """Switch ``model`` to the "hf_turbo" attention (after the probe) and record its state; returns the state
    (the existing one if it is already attached). ValueError for a model the engine cannot run exactly."""
    state = state_of(model)
    if state is not None:
        return state
    validate_model(model)
    register()
    cfg = config or TurboConfig()
    state = TurboState(original_attn=model.config._attn_implementation, config=cfg,
                       had_generate_attr="generate" in model.__dict__)
    if probe:  # the probe's record of each layer's sliding window is kept for the KV cache's sizing
        _check_packed_forward(model, cfg.backend, windows := {})
        state.extras["windows"] = {layer: int(w) for layer, w in windows.items() if w is not None}
    else:
        model.set_attn_implementation(ATTN_NAME)
    setattr(model, STATE_ATTR, state)
    logger.info("hf_turbo: %s runs the hf_turbo attention (was attn_implementation=%r)", type(model).__name__,
                state.original_attn)
    return state


def detach(model) -> None:
    """Give the model its own attention back and drop the state (what ``accelerate`` installed on top must
    be removed first)."""
    state = state_of(model)
    if state is None:
        return
    model.set_attn_implementation(state.original_attn)
    delattr(model, STATE_ATTR)
