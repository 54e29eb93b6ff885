"""One accelerated ``generate()`` call on the engine: HF arguments in, a stock-shaped result out.

Each row of ``input_ids`` (with its ``attention_mask``: left padding and masked holes) becomes one
engine request holding only its attended tokens, so no compute is spent on padding; the result is laid
out exactly like stock's: the input as given, then each row's new tokens, rows that stopped early
filled with ``pad_token_id``.

transformers' own processors that the sampler does not implement natively (``bad_words_ids``,
``remove_invalid_values``, ``no_repeat_ngram_size``, ``suppress_tokens``, ``forced_eos_token_id``, ...)
and a user's ``logits_processor`` list run per row through the request's ``logits_hook``, in stock's
order (after the repetition penalty and the min-length EOS suppression, before the warpers). Each
call sees that row as stock does: ``input_ids`` [1, L] holding the padded prompt as given plus the
row's new tokens, ``scores`` [1, V]. xgrammar's transformers processor (stateful over the batch) is
not called: each row gets its compiled grammar as ``SamplingParams.grammar``, whose mask the sampler
applies where the processor sits (after the other user processors), so such rows batch and speculate.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from hf_turbo.integrations.generate_cache import export_cache, import_rows
from hf_turbo.patches import compat
from hf_turbo.sampling import SamplingParams

__all__ = ["GenerateCall", "run_on_engine", "sampling_params", "max_new_tokens", "row_prompts", "full_mask",
           "split_xgrammar"]


@dataclass
class GenerateCall:
    """What one generate() call asks, after the fallback rule has accepted it."""

    input_ids: torch.Tensor | None  # [B, W]; None when only inputs_embeds are given
    attention_mask: torch.Tensor | None
    gen_config: object  # the call's GenerationConfig
    streamer: object | None = None
    tokenizer: object | None = None
    logits_processor: list | None = None  # the user's list (may be empty)
    past_key_values: object | None = None  # a transformers Cache to continue from
    inputs_embeds: torch.Tensor | None = None  # [B, W, H]: the prompt's vectors, used instead of its ids
    token_type_ids: torch.Tensor | None = None  # [B, W]
    per_row_processors: bool = False  # the config asks for transformers processors the sampler lacks

    def token_matrix(self) -> torch.Tensor:
        """``input_ids``, or zeros standing for the prompt positions of ``inputs_embeds`` alone."""
        if self.input_ids is not None:
            return self.input_ids
        return torch.zeros(self.inputs_embeds.shape[:2], dtype=torch.long, device=self.inputs_embeds.device)

    def row_inputs(self, mask: torch.Tensor) -> list[dict | None]:
        """Per row, the per-token model inputs of its attended prompt positions (``Request.model_inputs``)."""
        out = []
        for i in range(mask.shape[0]):
            cols = mask[i].bool()
            row = {name: t[i][cols] for name, t in (("inputs_embeds", self.inputs_embeds),
                                                     ("token_type_ids", self.token_type_ids)) if t is not None}
            out.append(row or None)
        return out


def eos_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(x) for x in value.reshape(-1).tolist()]
    return [int(x) for x in (value if isinstance(value, (list, tuple)) else [value])]


def full_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_id: int | None,
              eos_ids: list[int]) -> torch.Tensor:
    """The 2-D mask stock generate uses: the given one, else inferred from ``pad_token_id`` as stock
    infers it (when the pad id is not an EOS id), else all ones."""
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                             f"shape {tuple(input_ids.shape)}")
        return attention_mask.to(torch.long)
    if pad_id is not None and pad_id not in eos_ids and bool((input_ids == pad_id).any()):
        return (input_ids != pad_id).to(torch.long)
    return torch.ones_like(input_ids, dtype=torch.long)


def row_prompts(input_ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each row's attended tokens; ValueError on a row with none."""
    ids, keep = input_ids.tolist(), mask.bool().tolist()
    rows = [[t for t, m in zip(r, mr) if m] for r, mr in zip(ids, keep)]
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"input_ids row {i} is empty (its attention_mask has no 1s)")
    return rows


def max_new_tokens(gc, width: int) -> int:
    """New tokens a GenerationConfig asks for after ``width`` input columns (ValueError if negative)."""
    max_new = gc.max_new_tokens if gc.max_new_tokens is not None \
        else (gc.max_length if gc.max_length is not None else 20) - width
    if max_new < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new}")
    return max_new


# GenerationConfig field -> (SamplingParams field, its value when sampling, its value when greedy): the one
# table from generate()'s kwargs to the engine's params (max/min new tokens and EOS come from the width)
GENERATE_TO_PARAMS: dict[str, tuple[str, object, object]] = {
    "temperature": ("temperature", lambda gc: float(gc.temperature if gc.temperature is not None else 1.0), 0.0),
    "top_k": ("top_k", lambda gc: int(gc.top_k or 0), 0),
    "top_p": ("top_p", lambda gc: float(gc.top_p if gc.top_p is not None else 1.0), 1.0),
    "min_p": ("min_p", lambda gc: float(gc.min_p or 0.0), 0.0),
    "repetition_penalty": ("repetition_penalty", lambda gc: float(gc.repetition_penalty or 1.0),
                           lambda gc: float(gc.repetition_penalty or 1.0)),
    "eos_token_id": ("ignore_eos", lambda gc: not eos_list(gc.eos_token_id),
                     lambda gc: not eos_list(gc.eos_token_id)),
}


def sampling_params(gc, width: int) -> SamplingParams:
    """The engine's SamplingParams for a GenerationConfig and an input of ``width`` columns (at least one
    new token: a call for none never reaches the engine)."""
    max_new = max(max_new_tokens(gc, width), 1)
    sampling = bool(gc.do_sample)
    temperature = gc.temperature if gc.temperature is not None else 1.0
    if sampling and (not isinstance(temperature, (int, float)) or math.isnan(temperature) or temperature < 0):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if sampling and temperature == 0:
        raise ValueError("temperature must be > 0 when do_sample=True")
    min_new = max(gc.min_new_tokens or 0, (gc.min_length or 0) - width)
    fields = {}
    for name, when_sampling, when_greedy in GENERATE_TO_PARAMS.values():
        value = when_sampling if sampling else when_greedy
        fields[name] = value(gc) if callable(value) else value
    return SamplingParams(max_new_tokens=max_new, min_new_tokens=min(min_new, max_new), **fields)


class _RowProcessors:
    """transformers processors for one row, as the request's ``logits_hook``."""

    def __init__(self, processors: list, prompt_row: list[int]) -> None:
        self.processors = processors
        self.prompt_row = prompt_row  # the row as given, padding included: what stock's processors see
        self.request = None  # set once the engine has the request

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor([self.prompt_row + self.request.output_ids], device=scores.device)
        for proc in self.processors:
            scores = proc(ids, scores)
        return scores


def _stop_checker(gc, tokenizer):
    if not gc.stop_strings:
        return None
    if tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer: pass generate(..., tokenizer=tok)")
    from transformers.generation.stopping_criteria import StopStringCriteria

    crit = StopStringCriteria(tokenizer, gc.stop_strings)
    return lambda out_ids: bool(crit(torch.tensor([out_ids]), None)[0])


def _is_xgrammar(proc) -> bool:
    return type(proc).__module__ == "xgrammar.contrib.hf" and hasattr(proc, "compiled_grammars")


def split_xgrammar(processors: list | None) -> tuple[list, object | None, str | None]:
    """``(other processors, xgrammar's transformers processor or None, reason)``; the reason (for a stock
    fallback) is set when that processor is not the last of the list, where its mask cannot be applied."""
    procs = list(processors or [])
    found = [i for i, p in enumerate(procs) if _is_xgrammar(p)]
    if not found:
        return procs, None, None
    if found != [len(procs) - 1]:
        return procs, None, "logits_processor (xgrammar's processor must be the last one, and only one)"
    return procs[:-1], procs[-1], None


def _row_grammars(proc, batch: int) -> list:
    grammars = list(proc.compiled_grammars)
    if len(grammars) == 1:
        return grammars * batch
    if len(grammars) != batch:
        raise ValueError(f"logits_processor: xgrammar's processor holds {len(grammars)} compiled grammars for a "
                         f"batch of {batch}")
    return grammars


def run_on_engine(model, engine, call: GenerateCall):
    """Run ``call`` on ``engine``; returns what stock generate() returns for it."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    input_ids, gc = call.token_matrix(), call.gen_config
    given = input_ids if call.input_ids is not None else input_ids[:, :0]  # what stock calls input_ids
    batch, width = input_ids.shape
    eos_ids = eos_list(gc.eos_token_id)
    pad_id = gc.pad_token_id if gc.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    if max_new_tokens(gc, width) == 0:
        return given.clone()
    params = sampling_params(gc, width)
    mask = full_mask(input_ids, call.attention_mask, gc.pad_token_id if call.input_ids is not None else None,
                     eos_ids)
    prompts = row_prompts(input_ids, mask)
    row_inputs = call.row_inputs(mask)
    user, xgr_proc, _ = split_xgrammar(call.logits_processor)
    grammars = _row_grammars(xgr_proc, batch) if xgr_proc is not None else [None] * batch
    processors = compat.extra_logits_processors(model, gc, given, mask, user) \
        if user or call.per_row_processors else []
    imports = import_rows(call.past_key_values, mask, [len(p) for p in prompts]) \
        if call.past_key_values is not None else [None] * batch
    want_scores = bool(gc.return_dict_in_generate and (gc.output_scores or gc.output_logits))
    stop_checker = _stop_checker(gc, call.tokenizer)
    rids = []
    try:
        for i, row in enumerate(prompts):
            hook = _RowProcessors(processors, given[i].tolist()) if processors else None
            row_params = params if grammars[i] is None else dataclasses.replace(params, grammar=grammars[i])
            rid = engine.add_request(row, row_params, stop_checker=stop_checker, collect_scores=want_scores,
                                     logits_hook=hook, kv_import=imports[i], model_inputs=row_inputs[i])
            req = engine.requests[rid]
            req.eos_ids = () if params.ignore_eos else tuple(eos_ids)
            if hook is not None:
                hook.request = req
            rids.append(rid)
    except Exception:
        for rid in rids:
            engine.abort(rid)
        raise
    results = _drive(engine, rids, call.streamer, given)
    longest = max(len(o.token_ids) for o in results)
    new = torch.full((batch, longest), pad_id, dtype=input_ids.dtype)
    for i, o in enumerate(results):
        new[i, : len(o.token_ids)] = torch.tensor(o.token_ids, dtype=input_ids.dtype)
    new = new.to(input_ids.device)
    sequences = torch.cat([given, new], dim=1)
    if not gc.return_dict_in_generate:
        return sequences
    out = {"sequences": sequences}
    if want_scores:
        out["scores"] = _stack(results, "scores", longest, input_ids.device) if gc.output_scores else None
        out["logits"] = _stack(results, "raw_logits", longest, input_ids.device) if gc.output_logits else None
    if gc.use_cache is not False:
        ones = torch.ones((batch, longest), dtype=mask.dtype, device=mask.device)
        out[compat.cache_kwarg_name()] = export_cache(model, engine, torch.cat([input_ids, new], dim=1),
                                                      torch.cat([mask, ones], dim=1), row_inputs)
    return GenerateDecoderOnlyOutput(**out)


def _drive(engine, rids: list[str], streamer, input_ids: torch.Tensor) -> list:
    """Step the engine until every request in ``rids`` finished; streams batch-1 tokens."""
    if streamer is None:
        return engine.run_to_completion(rids)
    streamer.put(input_ids.cpu())
    sent = 0  # tokens streamed (the streamer takes batch 1 only)

    def stream(out) -> None:  # a speculative step may bring several tokens
        nonlocal sent
        streamer.put(torch.tensor(out.token_ids[sent:]))
        sent = len(out.token_ids)

    try:
        return engine.run_to_completion(rids, stream)
    finally:
        streamer.end()


def _stack(results: list, attr: str, longest: int, device) -> tuple[torch.Tensor, ...]:
    """Per step, the rows' tensors stacked ([B, V]); zeros for rows already finished."""
    vocab = getattr(results[0], attr)[0].shape[-1]
    return tuple(torch.stack([getattr(o, attr)[t] if t < len(getattr(o, attr)) else torch.zeros(vocab)
                              for o in results]).to(device) for t in range(longest))
