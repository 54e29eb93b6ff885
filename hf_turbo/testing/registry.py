"""Small random models for every causal-LM ``model_type`` in the installed transformers' registry.

:func:`registry_model` starts from :func:`~hf_turbo.testing.tiny.tiny_config`'s table (hidden 64,
2 layers, 4 heads, 2 KV heads, head_dim 16, vocab 512) and adds what config classes outside the
test-suite's own list need to build: the low-rank attention sizes of MLA families, and then, driven
by the config class's own error message rather than by model name, drops a knob the class refuses
(a read-only property, an unsupported value) or cuts a per-layer list to the layer count. A model
whose parameters (counted on the meta device, before any memory is spent) still exceed
``MAX_PARAMS`` is reported as not buildable from a small config (multimodal towers, fixed sizes).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from hf_turbo.testing import tiny

__all__ = ["registry_model_types", "registry_config", "registry_model", "MAX_PARAMS"]

MAX_PARAMS = 100_000_000  # a 64-wide, 2-layer model is ~0.2M parameters; more means a part did not shrink

# low-rank attention (MLA: deepseek_v2/v3, kimi, minicpm3, ...) sized to the tiny head_dim of 16
_EXTRA: dict[str, int] = {"qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "kv_lora_rank": 32,
                          "q_lora_rank": 32, "qk_head_dim": 16}
_MAX_RETRIES = 6
_NO_SETTER = re.compile(r"(?:property '(\w+)' of|Can't set (\w+) with)")


def registry_model_types() -> list[str]:
    """Every ``model_type`` with a causal-LM head in the installed transformers, sorted."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _named_in(message: str, kw: dict[str, Any]) -> list[str]:
    # knobs the error message names, longest first ("num_hidden_layers" before "hidden_size" would match)
    return sorted((k for k in kw if re.search(rf"\b{re.escape(k)}\b", message)), key=len, reverse=True)


def registry_config(model_type: str) -> PretrainedConfig:
    """Small config of any causal-LM ``model_type`` (see the module docstring for how it is found).

    Raises:
        ValueError: the type is not in the registry, is an encoder or encoder-decoder family, or its
            config class refuses every small variant tried (the message is the class's own).
    """
    tiny._check_decoder(model_type)
    defaults = tiny._defaults(model_type)
    alias = {real: name for name, real in getattr(defaults, "attribute_map", {}).items()}
    kw = {alias.get(k, k): v for k, v in {**tiny._SMALL, **_EXTRA}.items() if hasattr(defaults, k)}
    kw["num_hidden_layers"] = tiny.LAYERS
    tiny._derived(defaults, kw, {})
    if "qk_rope_head_dim" in kw:  # MLA: rotary sized by head_dim; K/V made per query head, no grouping
        if "head_dim" in kw:
            kw["head_dim"] = kw["qk_rope_head_dim"]
        for name in tiny._KV_HEAD_NAMES:
            if name in kw:
                kw[name] = kw.get("num_attention_heads", tiny.HEADS)
    kw.update(tiny._token_ids(defaults, kw.get("vocab_size", tiny.VOCAB), {}))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        for _ in range(_MAX_RETRIES):
            try:
                return AutoConfig.for_model(model_type, **kw)
            except Exception as exc:  # noqa: BLE001 - adapt to what the class says, else report it
                message = str(exc)
                if not _adapt(defaults, kw, message):
                    raise ValueError(f"{type(exc).__name__}: {message.splitlines()[0][:200]}") from exc
        raise ValueError(f"model_type {model_type!r}: no small config after {_MAX_RETRIES} tries")
    finally:
        hf_logging.set_verbosity(verbosity)


def _adapt(defaults: PretrainedConfig, kw: dict[str, Any], message: str) -> bool:
    """Change ``kw`` after the config class refused it with ``message``; False if nothing applies."""
    match = _NO_SETTER.search(message)
    if match:  # a derived, read-only attribute (falcon's head_dim): let the class compute it
        name = match.group(1) or match.group(2)
        if name in kw:
            del kw[name]
            return True
    full_types = getattr(defaults, "layer_types", None)
    if "layer_types" in message and "layer_types" not in kw and isinstance(full_types, list):
        layers = kw["num_hidden_layers"]
        kw["layer_types"] = (list(dict.fromkeys(full_types)) * layers)[:layers]  # every kind, then repeat
        return True
    for name in _named_in(message, kw):
        if name not in ("num_hidden_layers", "hidden_size", "vocab_size"):
            del kw[name]  # the class's default for the knob it objects to
            return True
    return False


def registry_model(model_type: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Seeded random-weight model of :func:`registry_config`, in eval mode (no download).

    Raises:
        ValueError: no small config, or the model would still have more than ``MAX_PARAMS`` parameters.
    """
    config = registry_config(model_type)
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in shell.parameters())
    del shell
    if params > MAX_PARAMS:
        raise ValueError(f"{params / 1e6:.0f}M parameters from the small config (a part it does not shrink)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    embed = model.get_input_embeddings()
    scale = getattr(embed, "embed_scale", None)
    if scale is not None and float(scale) != 1.0:  # as tiny_model: let attention, not the echo, decide
        with torch.no_grad():
            embed.weight.div_(float(scale) ** 0.5)
    return model.to(dtype).eval()
