"""Tiny random-weight decoders built from configs alone (no download), for tests across architectures.

One table (``_SMALL``) shrinks every config by attribute name: a knob is set only where the config class
has that attribute, directly or through its ``attribute_map`` (gpt2's ``n_embd`` is ``hidden_size``).
Values that depend on others (head_dim, kv heads, rotary_dim, sliding_window, layer count) are derived
in ``_derived``; token ids that fall outside the small vocabulary are moved inside it. No function per
model: any decoder-only family that transformers builds from a config goes through the same path.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)
from transformers.utils import logging as hf_logging

__all__ = ["TINY_ARCHS", "tiny_model", "tiny_config"]

# The architectures the test-suite builds and runs; tiny_model accepts any other decoder-only type too.
TINY_ARCHS: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi",
    "phi3",
    "starcoder2",
    "olmo2",
    "granite",
    "gpt2",
    "opt",
    "gpt_neox",
    "gptj",
    "cohere",
    "smollm3",
    "mixtral",
    "olmo3",
    "exaone4",
    "cohere2",
    "biogpt",
    "codegen",
    "qwen3_moe",
)

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
LAYERS = 2
PATTERN_LAYERS = 4  # enough for sliding:full and rope:nope patterns (3:1, 1:1) to show up
VOCAB = 512
SLIDING_WINDOW = 8  # shorter than test prompts, so windowed layers really drop keys
# 0.02 (the usual default) leaves a 64-wide random model with near-uniform logits, so greedy argmax
# would hinge on rounding noise; 0.15 gives clear winners.
INIT_STD = 0.15

# attribute name (as spelled in some config class, or an attribute_map alias) -> small value.
_SMALL: dict[str, int | float] = {
    "hidden_size": HIDDEN,  # n_embd via attribute_map
    "word_embed_proj_dim": HIDDEN,  # opt
    "num_attention_heads": HEADS,  # n_head
    "intermediate_size": 2 * HIDDEN,
    "ffn_dim": 2 * HIDDEN,  # opt
    "n_inner": 2 * HIDDEN,  # gpt2, gptj, codegen
    "ffn_hidden_size": 2 * HIDDEN,  # falcon
    "moe_intermediate_size": HIDDEN,
    "shared_expert_intermediate_size": HIDDEN,
    "vocab_size": VOCAB,
    "max_position_embeddings": 512,  # n_positions
    "original_max_position_embeddings": 512,  # phi3
    "n_ctx": 512,  # codegen
    "initializer_range": INIT_STD,
    "init_std": INIT_STD,  # opt
    "num_local_experts": 4,  # num_experts via attribute_map
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "logit_scale": 0.5,  # cohere's 0.0625 squeezes tiny-model logits together
}

# Knobs that follow another knob when the caller overrides only the leader.
_FOLLOWS: dict[str, str] = {"word_embed_proj_dim": "hidden_size"}

_KV_HEAD_NAMES = ("num_key_value_heads", "num_kv_heads")


@cache
def _defaults(model_type: str) -> PretrainedConfig:
    """Full-size default config of ``model_type`` (read only): which attributes exist, their patterns."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # default configs of some families warn about their own token ids
    try:
        return CONFIG_MAPPING[model_type]()
    finally:
        hf_logging.set_verbosity(verbosity)


def _check_decoder(model_type: str) -> None:
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"unknown model_type {model_type!r}; supported (tested): {', '.join(TINY_ARCHS)}")
    if model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"model_type {model_type!r} is an encoder-decoder model, not a decoder-only LM")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        # bert & co. register a causal-LM head, but it is an encoder run in decoder mode
        raise ValueError(f"model_type {model_type!r} is an encoder (masked-LM) family, not a decoder-only LM")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"model_type {model_type!r} has no causal-LM head in transformers, so it is not a decoder"
        )


def _non_uniform(values: Any) -> bool:
    return isinstance(values, (list, tuple)) and len(set(values)) > 1


def _derived(defaults: PretrainedConfig, kw: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Fill the knobs that depend on others, unless the caller set them."""
    hidden = kw.get("hidden_size", HIDDEN)
    heads = kw.get("num_attention_heads", HEADS)
    for name, leader in _FOLLOWS.items():
        if name in kw and name not in overrides and leader in overrides:
            kw[name] = kw[leader]
    head_dim = overrides.get("head_dim", hidden // heads)
    if hasattr(defaults, "head_dim") and "head_dim" not in overrides:
        kw["head_dim"] = head_dim
    for name in _KV_HEAD_NAMES:
        if hasattr(defaults, name) and name not in overrides:
            kw[name] = KV_HEADS if heads % KV_HEADS == 0 else heads
    if hasattr(defaults, "rotary_dim") and "rotary_dim" not in overrides:  # gptj, codegen: partial rotary
        kw["rotary_dim"] = max(2, head_dim // 2 // 2 * 2)
    window = getattr(defaults, "sliding_window", None)
    if isinstance(window, int) and window > 0 and "sliding_window" not in overrides:
        kw["sliding_window"] = SLIDING_WINDOW
    # gemma2's caps (50, 30) never bind on a tiny model's small scores; these do, so dropping one shows
    for name, cap in (("attn_logit_softcapping", 5.0), ("final_logit_softcapping", 3.0)):
        if getattr(defaults, name, None) is not None and name not in overrides:
            kw[name] = cap
    patterned = _non_uniform(getattr(defaults, "layer_types", None)) or _non_uniform(
        getattr(defaults, "no_rope_layers", None)
    )
    if patterned and "num_hidden_layers" not in overrides:
        kw["num_hidden_layers"] = PATTERN_LAYERS


def _token_ids(defaults: PretrainedConfig, vocab: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Move special token ids that lie past ``vocab`` to the top of the vocabulary, keeping distinct ids
    distinct (smollm3: bos 128000, eos 128001, pad 128004 -> 509, 510, 511)."""
    names = [n for n in dir(defaults) if n.endswith("_token_id") and n not in overrides]
    ids: dict[str, Any] = {}
    for name in names:
        try:
            value = getattr(defaults, name)
        except AttributeError:
            continue
        if isinstance(value, int) or (isinstance(value, list) and all(isinstance(v, int) for v in value)):
            ids[name] = value
    flat = {v for value in ids.values() for v in (value if isinstance(value, list) else [value])}
    big = sorted(v for v in flat if v >= vocab)
    remap = {v: vocab - len(big) + i for i, v in enumerate(big)}
    out: dict[str, Any] = {}
    for name, value in ids.items():
        if isinstance(value, list) and any(v in remap for v in value):
            out[name] = [remap.get(v, v) for v in value]
        elif isinstance(value, int) and value in remap:
            out[name] = remap[value]
    return out


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """Small config of ``model_type``: hidden 64, 4 heads (2 kv heads where the family has them),
    2 layers (4 where the family alternates layer kinds), vocab 512, sliding window 8.

    ``overrides`` are config attributes that win over the small defaults (``head_dim=80``,
    ``hidden_size=160, num_attention_heads=2``, ``sliding_window=None``...).

    Raises:
        ValueError: ``model_type`` is unknown to transformers or not a decoder-only LM.
    """
    _check_decoder(model_type)
    defaults = _defaults(model_type)
    # Work on one spelling per attribute, the attribute_map alias (gpt2: "n_embd" -> "hidden_size"), so a
    # caller's override meets the table's entry whichever spelling either uses; configs accept both.
    alias = {real: name for name, real in getattr(defaults, "attribute_map", {}).items()}
    overrides = {alias.get(k, k): v for k, v in overrides.items()}
    kw = {alias.get(k, k): v for k, v in _SMALL.items() if hasattr(defaults, k)}
    kw["num_hidden_layers"] = LAYERS
    kw.update(overrides)
    _derived(defaults, kw, overrides)
    kw.update(_token_ids(defaults, kw.get("vocab_size", VOCAB), overrides))
    config = AutoConfig.for_model(model_type, **kw)

    # a 5:1 family (gemma3) cut to 4 layers would be all sliding: keep one full layer so both kinds run
    types = getattr(config, "layer_types", None)
    full_size_types = getattr(defaults, "layer_types", None) or []
    if (
        "layer_types" not in overrides
        and isinstance(types, list)
        and "full_attention" in full_size_types
        and "full_attention" not in types
    ):
        kw["layer_types"] = types[:-1] + ["full_attention"]
        config = AutoConfig.for_model(model_type, **kw)
    return config


def tiny_model(
    model_type: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    **overrides: Any,
) -> PreTrainedModel:
    """Random-weight ``AutoModelForCausalLM`` of ``model_type`` built from :func:`tiny_config`, in eval mode.

    Weights depend only on ``seed`` and the config: the same call gives bitwise the same model, and the
    global RNG is left untouched. They are drawn in float32 and then cast, so ``dtype=torch.bfloat16``
    gives the float32 model rounded. ``attn_implementation`` is passed to transformers (None: its default).

    Raises:
        ValueError: ``model_type`` is unknown to transformers or not a decoder-only LM.
    """
    config = tiny_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    # gemma & biogpt multiply embeddings by sqrt(hidden): with tied weights the token's own embedding then
    # swamps the layers' outputs and greedy decoding echoes its input. Dividing by sqrt(embed_scale) keeps
    # the family's multiply but lets attention decide the argmax.
    embed = model.get_input_embeddings()
    scale = getattr(embed, "embed_scale", None)
    if scale is not None and float(scale) != 1.0:
        with torch.no_grad():
            embed.weight.div_(float(scale) ** 0.5)
    return model.to(dtype).eval()
