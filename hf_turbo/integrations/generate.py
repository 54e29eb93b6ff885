"""The accelerated ``generate()``: one rule decides engine or stock, ``generate_run`` does the rest.

What runs on the engine: ``input_ids`` with ``attention_mask`` (left padding, masked holes),
greedy and sampling, every transformers logits processor that does not reorder the warpers
(``bad_words_ids``, ``remove_invalid_values``, ``no_repeat_ngram_size``, ``suppress_tokens``, a user's
``logits_processor`` list, ...), ``stop_strings``, ``streamer`` (batch 1), ``return_dict_in_generate``
with scores, logits and the cache stock returns, ``past_key_values`` continued, ``position_ids`` equal
to stock's own, ``logits_to_keep`` (it only trims the forward's logits, which the engine computes only
where it samples). Everything else goes to stock ``generate()`` with one log line naming the argument:
beam search and other decoding methods, ``output_attentions``/``output_hidden_states``, stopping
criteria objects, and right-padded rows (stock predicts such a row's next token from its last, masked
column, which no engine sequence has). ``inputs_embeds`` and ``token_type_ids`` run on the engine as
per-token model inputs of the prompt (such requests skip the prefix cache and the lean forward).

``assistant_model=draft`` and ``prompt_lookup_num_tokens=k`` run on an engine with speculative
decoding (``hf_turbo.engine.spec``), batched, cached on the model per (method, draft, k); the output is
the same as without them.
"""

from __future__ import annotations

import logging

import torch

from hf_turbo.integrations.generate_cache import importable_reason
from hf_turbo.integrations.generate_run import GenerateCall, eos_list, full_mask, run_on_engine, split_xgrammar

logger = logging.getLogger(__name__)

__all__ = ["make_generate", "unsupported_reason", "per_row_processor_reason"]

# generation-config fields whose non-default values the engine does not implement -> fallback
_UNSUPPORTED_CONFIG = {
    "num_beams": 1, "num_return_sequences": 1, "penalty_alpha": None, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "sequence_bias": None, "renormalize_logits": False,
    "encoder_repetition_penalty": 1.0, "top_h": None, "max_time": None, "watermarking_config": None,
    "token_healing": False, "guidance_scale": None, "low_memory": None, "output_attentions": False,
    "output_hidden_states": False, "num_beam_groups": 1, "diversity_penalty": 0.0, "cache_implementation": None,
    "assistant_early_exit": None, "use_mtp": None,
}
# generation-config fields that run per row through transformers' own processors (the request's logits_hook)
_PER_ROW_CONFIG = {
    "no_repeat_ngram_size": 0, "bad_words_ids": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "exponential_decay_length_penalty": None,
    "remove_invalid_values": False, "encoder_no_repeat_ngram_size": 0,
}
# generate() keyword arguments that need stock generate() when given (not None, not an empty list)
_UNSUPPORTED_KWARGS = ("stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus", "negative_prompt_ids",
                       "negative_prompt_attention_mask", "custom_generate", "assistant_tokenizer")
# generate() keyword arguments the engine takes itself
_TAKEN_KWARGS = ("logits_processor", "past_key_values", "cache", "assistant_model", "logits_to_keep",
                 "position_ids", "use_model_defaults", "inputs_embeds", "token_type_ids")


def _non_default(gen_config, table: dict) -> str | None:
    for name, default in table.items():
        val = getattr(gen_config, name, default)
        if val is not None and val != default and not (default is None and val in (0, 0.0, 1, 1.0, False)):
            return name
    return None


def unsupported_reason(gen_config=None, kwargs: dict | None = None) -> str | None:
    """Name of the first argument (a ``generate()`` keyword in ``kwargs``, or a field of ``gen_config``)
    that needs stock generate(), or None if the engine covers all."""
    for name in _UNSUPPORTED_KWARGS:
        val = (kwargs or {}).get(name)
        if val is not None and val is not False and not (isinstance(val, (list, tuple)) and len(val) == 0):
            return name
    return None if gen_config is None else _non_default(gen_config, _UNSUPPORTED_CONFIG)


def per_row_processor_reason(gen_config) -> str | None:
    """The first config field served by a per-row transformers processor (which sees the row's padded
    width, so calls of different widths cannot be merged), or None."""
    return _non_default(gen_config, _PER_ROW_CONFIG)


def _right_padded(mask: torch.Tensor) -> bool:
    return bool((mask[:, -1] == 0).any())


def _has_holes(mask: torch.Tensor) -> bool:
    """Whether some row has a masked column after its first attended one."""
    started = mask.cumsum(-1) > 0
    return bool(((mask == 0) & started).any())


def _sliding_window(model) -> bool:
    """Whether some layer attends within a sliding window: stock measures that window in columns, so a
    row with masked holes sees fewer of its tokens than the engine's packed sequence would."""
    cfg = model.config.get_text_config()
    if getattr(cfg, "sliding_window", None) is None or getattr(cfg, "use_sliding_window", True) is False:
        return False
    layer_types = getattr(cfg, "layer_types", None)
    return not layer_types or any("sliding" in str(t) for t in layer_types)


def _default_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _call_or_reason(model, engine_for, inputs, generation_config, kwargs: dict) -> tuple[GenerateCall | None, str]:
    """The engine's view of a generate() call, or (None, the argument that needs stock generate())."""
    input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
    embeds, types = kwargs.get("inputs_embeds"), kwargs.get("token_type_ids")
    if input_ids is not None and (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2):
        return None, "inputs"
    if embeds is not None and (not isinstance(embeds, torch.Tensor) or embeds.dim() != 3
                               or (input_ids is not None and embeds.shape[:2] != input_ids.shape)):
        return None, "inputs_embeds"
    if input_ids is None and embeds is None:
        return None, "inputs"
    width_shape = input_ids.shape if input_ids is not None else embeds.shape[:2]
    if types is not None and (not isinstance(types, torch.Tensor) or types.shape != width_shape):
        return None, "token_type_ids"
    reason = unsupported_reason(kwargs=kwargs)
    if reason:
        return None, reason
    attention_mask = kwargs.pop("attention_mask", None)
    streamer, tokenizer = kwargs.pop("streamer", None), kwargs.pop("tokenizer", None)
    taken = {k: kwargs.pop(k, None) for k in _TAKEN_KWARGS}
    for k in _UNSUPPORTED_KWARGS:
        kwargs.pop(k, None)
    gen_config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    leftover = sorted(k for k, v in model_kwargs.items() if v is not None)
    if leftover:
        return None, leftover[0]
    reason = unsupported_reason(gen_config)
    if reason:
        return None, reason
    if streamer is not None and width_shape[0] > 1:
        return None, "streamer"
    if input_ids is None and (gen_config.max_new_tokens is None or (gen_config.repetition_penalty or 1.0) != 1.0):
        # stock counts max_length and the repetition penalty's history without the embedded prompt
        return None, "inputs_embeds (without input_ids, it needs max_new_tokens and no repetition_penalty)"
    xgr_reason = split_xgrammar(taken["logits_processor"])[2]
    if xgr_reason:
        return None, xgr_reason
    call = GenerateCall(input_ids, attention_mask, gen_config, streamer, tokenizer,
                        list(taken["logits_processor"] or []), None, embeds, types,
                        per_row_processors=per_row_processor_reason(gen_config) is not None)
    mask = full_mask(call.token_matrix(), attention_mask,
                     gen_config.pad_token_id if input_ids is not None else None, eos_list(gen_config.eos_token_id))
    if _right_padded(mask):
        return None, "right padding"
    if _has_holes(mask) and _sliding_window(model):
        return None, "attention_mask holes under a sliding window"
    positions = taken["position_ids"]
    if positions is not None and (positions.shape != mask.shape or not torch.equal(
            positions.masked_fill(mask == 0, 0).to(mask.device), _default_positions(mask))):
        return None, "position_ids"
    call.past_key_values = taken["past_key_values"] if taken["past_key_values"] is not None else taken["cache"]
    engine = engine_for(gen_config, taken["assistant_model"])
    if call.past_key_values is not None:
        reason = importable_reason(call.past_key_values, engine, *width_shape)
        if reason:
            return None, reason
    return (call, engine), ""


def make_generate(model, get_engine):
    """Build the instance-level ``generate`` installed by ``accelerate``; ``get_engine(model)`` gives the model's
    engine."""
    stock_generate = type(model).generate.__get__(model)

    def engine_for(gen_config, assistant):
        spec = _speculative_config(gen_config, assistant)
        return get_engine(model) if spec is None else _spec_engine(model, spec)

    @torch.no_grad()
    def generate(inputs=None, generation_config=None, **kwargs):
        call_kwargs = dict(kwargs)
        found, reason = _call_or_reason(model, engine_for, inputs, generation_config, kwargs)
        if found is None:
            logger.info("hf_turbo: generate() falls back to stock transformers because of %r", reason)
            with _stock_attention(model):
                return stock_generate(inputs, generation_config=generation_config, **call_kwargs)
        call, engine = found
        return run_on_engine(model, engine, call)

    generate.__doc__ = ("hf_turbo-accelerated generate(): same arguments and outputs as stock "
                        "transformers generate().\n\n" + (stock_generate.__doc__ or ""))
    return generate


# proposals per step when generate(assistant_model=...) does not set num_assistant_tokens (the adaptive k
# goes below it where acceptance is low)
_DEFAULT_ASSISTANT_TOKENS = 5
_MAX_SPEC_ENGINES = 4


def _speculative_config(gc, assistant):
    """The SpeculativeConfig for ``assistant_model`` / ``prompt_lookup_num_tokens``, or None."""
    from hf_turbo.config import SpeculativeConfig

    if assistant is not None:
        k = gc.num_assistant_tokens or _DEFAULT_ASSISTANT_TOKENS
        return SpeculativeConfig("draft", draft_model=assistant, num_tokens=int(k))
    if gc.prompt_lookup_num_tokens:
        return SpeculativeConfig("ngram", num_tokens=int(gc.prompt_lookup_num_tokens),
                                 ngram_max=int(gc.max_matching_ngram_size or 2))
    return None


def _spec_engine(model, spec):
    """The model's engine for this speculation (built once per method, draft and k; closed by restore)."""
    from hf_turbo.engine.engine import Engine

    engines = model._hf_turbo.extras.setdefault("spec_engines", {})
    key = (spec.method, id(spec.draft_model), spec.num_tokens, spec.ngram_max)
    engine = engines.get(key)
    if engine is None:
        if len(engines) >= _MAX_SPEC_ENGINES:  # forget the oldest (and give its draft back)
            engines.pop(next(iter(engines))).close()
        engine = engines[key] = Engine(model, None, model._hf_turbo.config.replace(speculative=spec))
    return engine


class _stock_attention:
    """Run stock generate with the model's original attention while accelerated (for fallbacks)."""

    def __init__(self, model) -> None:
        self.model = model
        self.saved = None

    def __enter__(self):
        state = self.model._hf_turbo
        self.saved = self.model.config._attn_implementation
        self.model.set_attn_implementation(state.original_attn)

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.saved)
        return False
