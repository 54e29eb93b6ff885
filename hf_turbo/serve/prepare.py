"""From a request body to the engine's input: JSON, validation, chat template, tokenization, params.

All of it is synchronous and can take seconds on a large prompt (a 1 MiB prompt tokenizes in ~1.6 s
here), so the server runs :meth:`RequestPreparer.prepare` in a thread pool, never on the event loop.
The tokenizers' Rust core releases the GIL while it encodes, so the loop keeps answering meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_turbo.sampling import SamplingParams
from hf_turbo.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, decode_json_body, parse_request
from hf_turbo.serve.rules import SAMPLER_FIELDS
from hf_turbo.serve.tools import forced_schema

__all__ = ["RequestPreparer", "Prepared", "param_of"]

_DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
# SamplingParams field -> the HTTP parameter a user sets it with
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "temperature": "temperature",
                "top_p": "top_p", "top_k": "top_k", "seed": "seed", "stop": "stop", "logprobs": "logprobs",
                "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                "frequency_penalty": "frequency_penalty", "logit_bias": "logit_bias", "n": "n"}
_OPENAI_PENALTIES = ("presence_penalty", "frequency_penalty", "logit_bias")


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    req: CompletionRequest | ChatCompletionRequest
    prompt_ids: list[int]
    params: SamplingParams


class RequestPreparer:
    """Turns request bodies into :class:`Prepared` for one model (thread-safe: holds no request state)."""

    def __init__(self, tokenizer, model_name: str, context_limit: int, vocab_size: int,
                 chat_template: str | None, grammars=None) -> None:
        self.tok = tokenizer
        self.model_name = model_name
        self.context_limit = context_limit
        self.vocab_size = vocab_size
        self.chat_template = chat_template
        self.grammars = grammars  # the engine's StepGrammar: grammars compile here, off the engine thread

    def prepare(self, raw: bytes, chat: bool) -> Prepared:
        """Everything from the body's bytes to :class:`SamplingParams`; bad input raises APIError (4xx)."""
        req = parse_request(ChatCompletionRequest if chat else CompletionRequest, decode_json_body(raw))
        if req.model != self.model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves "
                           f"'{self.model_name}'.", "model", code="model_not_found")
        prompt_ids = self._prompt_ids(req, chat)
        return Prepared(req, prompt_ids, self._params(req, chat, len(prompt_ids)))

    def _prompt_ids(self, req, chat: bool) -> list[int]:
        tok = self.tok
        if chat:
            template = self.chat_template or getattr(tok, "chat_template", None)
            if not template:
                raise APIError(400, "Invalid 'messages': this model's tokenizer has no chat template; "
                               "use /v1/completions or start the server with --chat-template.", "messages")
            msgs = [{"role": m.role, "content": m.content,
                     **{k: getattr(m, k) for k in ("name", "tool_calls", "tool_call_id") if getattr(m, k) is not None}}
                    for m in req.messages]
            tools = {"tools": req.tools} if req.tools and req.tool_choice != "none" else {}
            try:
                text = tok.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                               add_generation_prompt=True, **tools)
            except Exception as exc:  # jinja raise_exception(...) in templates: bad conversation shape
                raise APIError(400, f"Invalid 'messages': the chat template rejected them: {exc}",
                               "messages") from None
            return tok(text, add_special_tokens=False)["input_ids"]
        if isinstance(req.prompt, str):
            return tok(req.prompt, add_special_tokens=True)["input_ids"]
        bad = next((t for t in req.prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"Invalid 'prompt': token id {bad} is outside the vocabulary [0, {self.vocab_size}).",
                           "prompt")
        return list(req.prompt)

    def _params(self, req, chat: bool, prompt_len: int) -> SamplingParams:
        prompt_param = "messages" if chat else "prompt"
        room = self.context_limit - prompt_len
        if room < 1:
            raise APIError(400, f"Invalid '{prompt_param}': it has {prompt_len} tokens but this model's maximum "
                           f"context length is {self.context_limit} tokens.", prompt_param)
        if chat:
            max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            max_new = req.max_new_tokens
            default = room
        else:
            max_param, max_new, default = "max_tokens", req.max_tokens, min(_DEFAULT_COMPLETION_TOKENS, room)
        if max_new is None:
            max_new = default
        elif prompt_len + max_new > self.context_limit:
            raise APIError(400, f"Invalid '{max_param}': the prompt ({prompt_len} tokens) plus {max_param} "
                           f"({max_new}) is over this model's maximum context length of {self.context_limit} "
                           "tokens.", max_param)
        if req.min_tokens and req.min_tokens > max_new:
            raise APIError(400, f"Invalid 'min_tokens': {req.min_tokens} is more than {max_param} ({max_new}).",
                           "min_tokens")
        if chat:
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            logprobs = req.logprobs
        extra = {}
        if set(_OPENAI_PENALTIES) <= SAMPLER_FIELDS:  # the sampler implements them (else the rules refused them)
            bad = next((t for t in req.logit_bias or () if t >= self.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"Invalid 'logit_bias': token id {bad} is outside the vocabulary "
                               f"[0, {self.vocab_size}).", "logit_bias")
            extra = {"presence_penalty": float(req.presence_penalty or 0.0),
                     "frequency_penalty": float(req.frequency_penalty or 0.0), "logit_bias": req.logit_bias or None}
        extra.update(self._structured(req, chat))
        try:
            return SamplingParams(n=req.n or 1,
                max_new_tokens=max_new, min_new_tokens=req.min_tokens or 0,
                temperature=1.0 if req.temperature is None else float(req.temperature),
                top_p=1.0 if req.top_p is None else float(req.top_p),
                top_k=0 if req.top_k in (None, -1) else req.top_k, seed=req.seed, stop=req.stop or (),
                logprobs=logprobs, ignore_eos=bool(req.ignore_eos),
                repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
                **extra)
        except ValueError as exc:
            param = param_of(exc, None)
            raise APIError(400, f"Invalid value for '{param}': {exc}", param) from None


    def _structured(self, req, chat: bool) -> dict:
        """The request's output constraint as a SamplingParams field, compiled here (the engine then finds it
        in the cache); a spec xgrammar rejects is a 400 naming the request field it came from."""
        field, value, param = None, None, None
        rf = req.response_format
        if chat and req.forced_tool_choice is not None:
            value = forced_schema(req.tools, req.forced_tool_choice, req.parallel_tool_calls is not False)
            field, param = "json_schema", "tools"
        elif rf is not None and rf.get("type") == "json_object":
            field, value, param = "json_schema", {"type": "object"}, "response_format"
        elif rf is not None and rf.get("type") == "json_schema":
            spec = rf["json_schema"]
            field, value, param = "json_schema", spec.get("schema") or {"type": "object"}, "response_format"
        else:
            for name, sp_field in (("guided_json", "json_schema"), ("guided_regex", "regex"),
                                   ("guided_grammar", "grammar"), ("guided_choice", "choices")):
                if getattr(req, name) is not None:
                    field, value, param = sp_field, getattr(req, name), name
        if field is None:
            return {}
        if self.grammars is None:
            raise APIError(400, f"Invalid value for '{param}': this server has no grammar engine.", param)
        try:
            self.grammars.compiler.compile(field, value)
        except ValueError as exc:
            why = str(exc).removeprefix(f"SamplingParams.{field} ")
            raise APIError(400, f"Invalid value for '{param}': it {why}", param) from None
        return {field: value}


def param_of(exc: ValueError, default: str | None) -> str | None:
    """The HTTP parameter a ``SamplingParams.<field> ...`` error is about (``default`` for other errors)."""
    words = str(exc).split()
    field = words[0].removeprefix("SamplingParams.") if words and words[0].startswith("SamplingParams.") else None
    return _PARAM_NAMES.get(field, default)
