"""The accelerated ``generate()``: HF arguments mapped onto the hf_turbo engine.

Each row of ``input_ids`` (with its ``attention_mask``, left or right padded) becomes one engine
request holding only its real tokens, so no compute is spent on padding; the result is laid out
exactly like stock's: the input as given, then each row's new tokens, rows that stopped early
filled with ``pad_token_id``. Whatever the engine does not cover (beam search, custom logits
processors, constraints, ...) goes to stock ``generate()`` with one log line naming the argument.

``assistant_model=draft`` and ``prompt_lookup_num_tokens=k`` run on an engine with speculative
decoding (``hf_turbo.spec``), batched, cached on the model per (method, draft, k); the output is
the same as without them.
"""

from __future__ import annotations

import logging
import math

import torch

from hf_turbo.sampling import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["make_generate", "unsupported_reason"]

# generation-config fields whose non-default values the engine does not implement -> fallback
_UNSUPPORTED_CONFIG = {
    "num_beams": 1, "num_return_sequences": 1, "penalty_alpha": None, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
    "sequence_bias": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "exponential_decay_length_penalty": None,
    "renormalize_logits": False, "encoder_repetition_penalty": 1.0, "top_h": None, "max_time": None,
    "watermarking_config": None, "token_healing": False, "guidance_scale": None, "low_memory": None,
    "remove_invalid_values": False, "output_attentions": False, "output_hidden_states": False,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "use_cache": True, "cache_implementation": None,
    "assistant_early_exit": None, "use_mtp": None,
}
# generate() keyword arguments the engine does not take -> fallback
_UNSUPPORTED_KWARGS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                       "negative_prompt_ids", "negative_prompt_attention_mask",
                       "inputs_embeds", "past_key_values", "cache", "custom_generate", "assistant_tokenizer",
                       "token_type_ids", "use_model_defaults")
_EMPTY_OK = ("logits_processor", "stopping_criteria")


def unsupported_reason(gen_config, kwargs: dict) -> str | None:
    """Name of the first argument that needs stock generate(), or None if the engine covers all."""
    for name in _UNSUPPORTED_KWARGS:
        val = kwargs.get(name)
        if val is None or (name in _EMPTY_OK and len(val) == 0):
            continue
        if name == "use_model_defaults":
            continue
        return name
    for name, default in _UNSUPPORTED_CONFIG.items():
        val = getattr(gen_config, name, default)
        if val is not None and val != default and not (default is None and val in (0, 0.0, 1, 1.0, False)):
            return name
    return None


def _eos_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(x) for x in value.reshape(-1).tolist()]
    return [int(x) for x in (value if isinstance(value, (list, tuple)) else [value])]


def make_generate(model):
    """Build the instance-level ``generate`` installed by ``accelerate``."""
    stock_generate = type(model).generate.__get__(model)

    @torch.no_grad()
    def generate(inputs=None, generation_config=None, **kwargs):
        from hf_turbo.api import get_engine

        input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
        attention_mask = kwargs.pop("attention_mask", None)
        streamer = kwargs.pop("streamer", None)
        tokenizer = kwargs.pop("tokenizer", None)
        call_kwargs = dict(kwargs)
        kwargs.pop("use_model_defaults", None)

        def fallback(reason: str):
            logger.info("hf_turbo: generate() falls back to stock transformers because of %r", reason)
            args = dict(call_kwargs)
            if attention_mask is not None:
                args["attention_mask"] = attention_mask
            if streamer is not None:
                args["streamer"] = streamer
            if tokenizer is not None:
                args["tokenizer"] = tokenizer
            with _stock_attention(model):
                return stock_generate(input_ids, generation_config=generation_config, **args)

        if input_ids is None or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            return fallback("inputs")
        reason = next((k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None
                       and not (k in _EMPTY_OK and len(kwargs[k]) == 0) and k != "use_model_defaults"), None)
        if reason:
            return fallback(reason)
        for k in _UNSUPPORTED_KWARGS:
            kwargs.pop(k, None)
        assistant = kwargs.pop("assistant_model", None)
        gen_config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
        model_kwargs = {k: v for k, v in model_kwargs.items() if v is not None}
        if model_kwargs:
            return fallback(sorted(model_kwargs)[0])
        reason = unsupported_reason(gen_config, {})
        if reason:
            return fallback(reason)
        batch, width = input_ids.shape
        if streamer is not None and batch > 1:
            return fallback("streamer")
        spec = _speculative_config(gen_config, assistant)
        engine = get_engine(model) if spec is None else _spec_engine(model, spec)
        return _engine_generate(model, engine, input_ids, attention_mask, gen_config, streamer, tokenizer)

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


def _row_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_id: int | None,
                 eos_ids: list[int]) -> list[list[int]]:
    ids = input_ids.tolist()
    if attention_mask is None and pad_id is not None and pad_id not in eos_ids and (input_ids == pad_id).any():
        attention_mask = input_ids != pad_id  # what stock infers when no mask is given
    if attention_mask is None:
        rows = ids
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                             f"shape {tuple(input_ids.shape)}")
        mask = attention_mask.bool().tolist()
        rows = [[t for t, m in zip(r, mr) if m] for r, mr in zip(ids, mask)]
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"input_ids row {i} is empty (its attention_mask has no 1s)")
    return rows


def _engine_generate(model, engine, input_ids, attention_mask, gc, streamer, tokenizer):
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    batch, width = input_ids.shape
    eos_ids = _eos_list(gc.eos_token_id)
    pad_id = gc.pad_token_id
    if pad_id is None:
        pad_id = eos_ids[0] if eos_ids else 0
    if gc.max_new_tokens is not None:
        max_new = gc.max_new_tokens
    else:
        max_new = (gc.max_length if gc.max_length is not None else 20) - width
    if max_new < 0 or (gc.max_new_tokens is not None and gc.max_new_tokens < 0):
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new}")
    if max_new == 0:
        return input_ids.clone()
    min_new = max(gc.min_new_tokens or 0, (gc.min_length or 0) - width)
    sampling = bool(gc.do_sample)
    temperature = gc.temperature if gc.temperature is not None else 1.0
    if sampling and (not isinstance(temperature, (int, float)) or math.isnan(temperature) or temperature < 0):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if sampling and temperature == 0:
        raise ValueError("temperature must be > 0 when do_sample=True")
    params = SamplingParams(
        max_new_tokens=max_new,
        min_new_tokens=min(min_new, max_new),
        temperature=float(temperature) if sampling else 0.0,
        top_k=int(gc.top_k or 0) if sampling else 0,
        top_p=float(gc.top_p if gc.top_p is not None else 1.0) if sampling else 1.0,
        min_p=float(gc.min_p or 0.0) if sampling else 0.0,
        repetition_penalty=float(gc.repetition_penalty or 1.0),
        ignore_eos=not eos_ids,
    )
    stop_checker = None
    if gc.stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: pass generate(..., tokenizer=tok)")
        from transformers.generation.stopping_criteria import StopStringCriteria

        crit = StopStringCriteria(tokenizer, gc.stop_strings)

        def stop_checker(out_ids: list[int]) -> bool:
            return bool(crit(torch.tensor([out_ids]), None)[0])

    prompts = _row_prompts(input_ids, attention_mask, gc.pad_token_id, eos_ids)
    want_scores = bool(gc.return_dict_in_generate and (gc.output_scores or gc.output_logits))
    eos_override = tuple(eos_ids)
    rids = []
    try:
        for row in prompts:
            rid = engine.add_request(row, params, stop_checker=stop_checker, collect_scores=want_scores)
            engine.requests[rid].eos_ids = () if params.ignore_eos else eos_override
            rids.append(rid)
    except Exception:
        for rid in rids:
            engine.abort(rid)
        raise
    if streamer is not None:
        streamer.put(input_ids.cpu())
    outs = {}
    pending = set(rids)
    sent = 0  # tokens streamed (the streamer takes batch 1 only)
    try:
        while pending:
            for out in engine.step():
                if out.request_id not in pending:
                    continue
                if streamer is not None:  # a speculative step may bring several tokens
                    streamer.put(torch.tensor(out.token_ids[sent:]))
                    sent = len(out.token_ids)
                if out.finished:
                    outs[out.request_id] = out
                    pending.discard(out.request_id)
    except BaseException:
        for rid in pending:
            engine.abort(rid)
        raise
    finally:
        if streamer is not None:
            streamer.end()
    results = [outs[r] for r in rids]
    longest = max(len(o.token_ids) for o in results)
    new = torch.full((batch, longest), pad_id, dtype=input_ids.dtype)
    for i, o in enumerate(results):
        new[i, : len(o.token_ids)] = torch.tensor(o.token_ids, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
    if not gc.return_dict_in_generate:
        return sequences
    scores = logits = None
    if want_scores:
        vocab = results[0].scores[0].shape[-1]

        def stack(attr: str):
            steps = []
            for t in range(longest):
                rows = [getattr(o, attr)[t] if t < len(getattr(o, attr)) else torch.zeros(vocab)
                        for o in results]
                steps.append(torch.stack(rows).to(input_ids.device))
            return tuple(steps)

        scores = stack("scores") if gc.output_scores else None
        logits = stack("raw_logits") if gc.output_logits else None
    return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, logits=logits)
