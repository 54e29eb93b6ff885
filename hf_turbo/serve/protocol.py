"""OpenAI's wire format for ``hf-turbo serve``: request models, errors, response objects.

Every bad request becomes an :class:`APIError` rendered in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with ``param`` naming the offending parameter
(``messages[1].role``, ``temperature``, ...) and the message naming it too. Errors about the body as
a whole (not JSON, not UTF-8, too large, wrong content type) have ``param: null``, as OpenAI's do.

The models are strict (JSON ``"1"`` is not a number, ``true`` is not an integer) and ignore unknown
fields, like OpenAI's API. Supported beyond OpenAI (vLLM's names): ``top_k``, ``min_tokens``,
``repetition_penalty``, ``ignore_eos``.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["APIError", "error_body", "decode_json_body", "parse_request", "CompletionRequest",
           "ChatCompletionRequest", "ChatMessage", "StreamOptions", "ResponseFormatter"]

_MAX_STOP = 4
_MAX_LOGPROBS = 20
_LOGPROB_FLOOR = -9999.0  # JSON has no -Infinity


class APIError(Exception):
    """An HTTP error answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.param, self.type, self.code)


def error_body(message: str, param: str | None = None, type: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def decode_json_body(raw: bytes) -> dict:
    """UTF-8 JSON object from a request body (NaN/Infinity literals are accepted here and rejected
    later by the parameter they were given for, so that the error can name it)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"The request body is not valid UTF-8 (byte {exc.start}).") from None
    if not text.strip():
        raise APIError(400, "The request body is empty: send a JSON object.")
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request: {exc}.") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"The request body must be a JSON object, got a JSON {_json_type(obj)}.")
    return obj


def _json_type(obj) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(obj), type(obj).__name__)


def _param_name(loc: tuple) -> str:
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name


def parse_request(model_cls: type[BaseModel], body: dict):
    """Validate ``body`` into ``model_cls``; the first problem becomes a 400 naming its parameter."""
    try:
        req = model_cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = _param_name(err["loc"]) or None
        if err["type"] == "missing":
            raise APIError(400, f"Missing required parameter: '{param}'.", param) from None
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        got = err.get("input")
        shown = "" if err["type"] == "value_error" or isinstance(got, (dict, list)) else f", got {got!r}"
        raise APIError(400, f"Invalid value for '{param}': {msg}{shown}.", param) from None
    if hasattr(req, "check"):
        req.check()
    return req


def _in_range(name: str, v: float, lo: float, hi: float, lo_open: bool = False) -> float:
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    if v < lo or v > hi or (lo_open and v == lo):
        interval = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ValueError(f"{name} must be in {interval}, got {v}")
    return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class _SamplingFields(BaseModel):
    """The sampling parameters shared by completions and chat completions."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Any = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    user: str | None = None
    top_k: int | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"max_tokens must be at least 1, got {v}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        return v if v is None else _in_range("temperature", v, 0.0, 2.0)

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v):
        return v if v is None else _in_range("top_p", v, 0.0, 1.0, lo_open=True)

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v is not None and v != 1:
            raise ValueError(f"only n=1 is supported, got n={v}")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v, info):
        if v is not None and v != 0:
            raise ValueError(f"{info.field_name} is not supported (only 0), got {v}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return ()
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or any(not isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > _MAX_STOP:
            raise ValueError(f"stop takes at most {_MAX_STOP} strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return tuple(stops)

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v):
        if v is not None and v < 0 and v != -1:
            raise ValueError(f"top_k must be >= 0 (or -1 to disable it), got {v}")
        return v

    @field_validator("min_tokens")
    @classmethod
    def _min_tokens(cls, v):
        if v is not None and v < 0:
            raise ValueError(f"min_tokens must be >= 0, got {v}")
        return v

    @field_validator("repetition_penalty")
    @classmethod
    def _repetition_penalty(cls, v):
        if v is not None and (math.isnan(v) or math.isinf(v) or v <= 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {v}")
        return v

    def check(self) -> None:
        """Rules across fields (pydantic would report them without a parameter name)."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "Invalid value for 'stream_options': only allowed when stream is true.",
                           "stream_options")


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. ``prompt``: a string, a list of token ids, or a list holding one of them."""

    prompt: Any = Field(...)
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]  # a batch of one
        if isinstance(v, str):
            if not v:
                raise ValueError("prompt must not be empty")
            return v
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
                return v
            if all(isinstance(t, (str, list)) for t in v):
                raise ValueError(f"only one prompt per request is supported, got {len(v)}")
        raise ValueError("prompt must be a string or a list of token ids")

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        if v is not None and not (0 <= v <= _MAX_LOGPROBS):
            raise ValueError(f"logprobs must be in [0, {_MAX_LOGPROBS}], got {v}")
        return v

    @field_validator("echo")
    @classmethod
    def _echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        if v is not None and v != 1:
            raise ValueError(f"only best_of=1 is supported, got {v}")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if isinstance(v, str):
            return v
        if isinstance(v, list):
            texts = []
            for part in v:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("content must be a string or a list of text parts")


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None
    response_format: dict | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v):
        if not v:
            raise ValueError("messages must hold at least one message")
        return v

    @field_validator("max_completion_tokens")
    @classmethod
    def _max_completion_tokens(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"max_completion_tokens must be at least 1, got {v}")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v):
        if v is not None and not (0 <= v <= _MAX_LOGPROBS):
            raise ValueError(f"top_logprobs must be in [0, {_MAX_LOGPROBS}], got {v}")
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v):
        if v:
            raise ValueError("tools are not supported")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        if v not in (None, "none"):
            raise ValueError("tool_choice is not supported")
        return v

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v):
        if v is not None and v.get("type") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        return v

    def check(self) -> None:
        super().check()
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "Invalid value for 'top_logprobs': it needs logprobs=true.", "top_logprobs")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -- responses ----------------------------------------------------------------------------------
def _json_logprob(x: float) -> float:
    return x if math.isfinite(x) else _LOGPROB_FLOOR


class ResponseFormatter:
    """OpenAI response objects for one request: the whole response, or its stream chunks.

    Token strings in logprobs are single-token decodes; logprobs of ``-inf`` become -9999.0 (JSON
    has no infinities). While streaming, logprobs of all tokens come with the final chunk.
    """

    def __init__(self, tokenizer, model_name: str, req, chat: bool, rid: str, prompt_tokens: int) -> None:
        self.tok = tokenizer
        self.model_name = model_name
        self.req = req
        self.chat = chat
        self.rid = rid
        self.prompt_tokens = prompt_tokens
        self.created = int(time.time())
        self.include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        self.want_logprobs = bool(req.logprobs) if chat else req.logprobs is not None
        self.prompt_chars = len(req.prompt) if not chat and isinstance(req.prompt, str) else 0

    def _usage(self, out) -> dict:
        n = len(out.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def _head(self, chunk: bool) -> dict:
        if self.chat:
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model_name}

    def _token(self, tid: int) -> str:
        return self.tok.decode([tid])

    def _logprobs(self, out):
        if not self.want_logprobs or out.logprobs is None:
            return None
        ids, entries = out.token_ids, out.logprobs
        if self.chat:
            n = self.req.top_logprobs or 0
            content = []
            for tid, entry in zip(ids, entries):
                s = self._token(tid)
                top = sorted(entry.items(), key=lambda kv: -kv[1])[:n]
                content.append({"token": s, "logprob": _json_logprob(entry[tid]), "bytes": list(s.encode()),
                                "top_logprobs": [{"token": (t := self._token(k)), "logprob": _json_logprob(v),
                                                  "bytes": list(t.encode())} for k, v in top]})
            return {"content": content}
        tokens = [self._token(t) for t in ids]
        offsets, pos = [], self.prompt_chars
        for s in tokens:
            offsets.append(pos)
            pos += len(s)
        top = [{self._token(k): _json_logprob(v) for k, v in sorted(e.items(), key=lambda kv: -kv[1])} for e in entries]
        return {"tokens": tokens, "token_logprobs": [_json_logprob(e[t]) for t, e in zip(ids, entries)],
                "top_logprobs": top, "text_offset": offsets}

    # -- whole response -------------------------------------------------------------------------
    def response(self, final) -> dict:
        out = final.output
        choice = {"index": 0, "logprobs": self._logprobs(out), "finish_reason": final.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": out.text or ""}
        else:
            choice["text"] = out.text or ""
        return {**self._head(False), "choices": [choice], "usage": self._usage(out)}

    # -- stream ---------------------------------------------------------------------------------
    def _chunk(self, delta: dict | str | None, finish_reason=None, logprobs=None) -> dict:
        choice = {"index": 0}
        if self.chat:
            choice["delta"] = delta if isinstance(delta, dict) else ({} if delta is None else {"content": delta})
        else:
            choice["text"] = delta or ""
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish_reason
        event = {**self._head(True), "choices": [choice]}
        if self.include_usage:
            event["usage"] = None
        return event

    def start_events(self) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""})] if self.chat else []

    def delta_events(self, delta) -> list[dict]:
        if not delta.text:
            return []
        return [self._chunk(delta.text)]

    def end_events(self, final) -> list[dict]:
        events = [self._chunk(None, final.finish_reason, self._logprobs(final.output))]
        usage = self._usage(final.output)
        if self.include_usage:
            events.append({**self._head(True), "choices": [], "usage": usage})
        return events
