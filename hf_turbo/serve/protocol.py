"""OpenAI's wire format for ``hf-turbo serve``: errors, body decoding, request models.

Every bad request becomes an :class:`APIError` rendered in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with ``param`` naming the offending parameter
(``messages[1].role``, ``temperature``, ...) and the message naming it too. Errors about the body as
a whole (not JSON, not UTF-8, too large, wrong content type) have ``param: null``, as OpenAI's do.

The models are strict (JSON ``"1"`` is not a number, ``true`` is not an integer) and ignore unknown
fields, like OpenAI's API; the value rules live in one table per route (:mod:`hf_turbo.serve.rules`).
Supported beyond OpenAI (vLLM's names): ``top_k``, ``min_tokens``, ``repetition_penalty``,
``ignore_eos``, and the structured-output fields ``guided_json``, ``guided_regex``, ``guided_grammar``,
``guided_choice`` (at most one of them, ``response_format`` and a forcing ``tool_choice``).
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from hf_turbo.serve.responses import ResponseFormatter
from hf_turbo.serve.rules import CHAT_RULES, COMPLETION_RULES, STRUCTURED_FIELDS

__all__ = ["APIError", "error_body", "json_bytes", "decode_json_body", "parse_request", "CompletionRequest",
           "ChatCompletionRequest", "ChatMessage", "StreamOptions", "ResponseFormatter"]

# A lone surrogate can only come from a \uD800-\uDFFF escape: the UTF-8 decoder refuses raw ones.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SHOWN_INPUT = 80  # characters of a bad value echoed back in an error message


class APIError(Exception):
    """An HTTP error answered in OpenAI's error shape (``headers``: extra response headers)."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.param, self.type, self.code)


def error_body(message: str, param: str | None = None, type: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def json_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON; text that is not valid Unicode (lone surrogates) is sent \\u-escaped
    instead of failing the response."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def decode_json_body(raw: bytes) -> dict:
    """UTF-8 JSON object from a request body (NaN/Infinity literals are accepted here and rejected
    later by the parameter they were given for, so that the error can name it). Integers past
    Python's digit limit and strings that are not valid Unicode get a 400 naming where they are."""
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
    except ValueError:  # an integer literal over sys.get_int_max_str_digits(), json.loads's only other error
        path = _find(json.loads(text, parse_int=_long_int), lambda v: isinstance(v, _LongInt))
        why = f"an integer has more than {sys.get_int_max_str_digits()} digits"
        err = APIError(400, f"Invalid value for '{path}': {why}.", path) if path else \
            APIError(400, f"Invalid request body: {why}.")
        raise err from None
    if not isinstance(obj, dict):
        raise APIError(400, f"The request body must be a JSON object, got a JSON {_json_type(obj)}.")
    if _SURROGATE_ESCAPE.search(text):
        path = _find(obj, _not_unicode)
        why = "a lone UTF-16 surrogate (a \\uD800-\\uDFFF escape without its pair), which is not valid Unicode"
        if path:
            raise APIError(400, f"Invalid value for '{path}': it holds {why}.", path)
        if path is not None:  # one of the body's own keys
            raise APIError(400, f"Invalid request body: a key holds {why}.")
    return obj


class _LongInt:
    """Stands in for an integer literal too long to convert, to find which parameter held it."""


def _long_int(digits: str):
    try:
        return int(digits)
    except ValueError:
        return _LongInt()


def _not_unicode(v) -> bool:
    if not isinstance(v, str) or v.isascii():
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _find(obj, bad) -> str | None:
    """The parameter name of the first value (or object key) in ``obj`` for which ``bad`` holds; a bad
    key is named by its object (the key itself cannot be shown). Iterative: nesting is as deep as
    json.loads allows, which is about Python's recursion limit."""
    stack = [((), obj)]
    while stack:
        loc, value = stack.pop()
        if bad(value):
            return _param_name(loc)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        children = []
        for key, child in items:
            if bad(key):
                return _param_name(loc)
            children.append(((*loc, key), child))
        stack.extend(reversed(children))  # depth-first, in document order
    return None


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
        shown = ""
        if err["type"] != "value_error" and not isinstance(got, (dict, list)):
            shown = repr(got)
            shown = f", got {shown[:_SHOWN_INPUT] + '...' if len(shown) > _SHOWN_INPUT else shown}"
        raise APIError(400, f"Invalid value for '{param}': {msg}{shown}.", param) from None
    if hasattr(req, "check"):
        req.check()
    return req


class _Strict(BaseModel):
    """Strict types, unknown fields ignored, and the class's value ``rules`` applied to every field
    that is present and not null."""

    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra=lambda s, cls: cls._schema_extra(s))
    rules: ClassVar[dict] = {}

    @field_validator("*")
    @classmethod
    def _apply_rule(cls, v, info: ValidationInfo):
        rule = cls.rules.get(info.field_name)
        return v if rule is None or v is None else rule(info.field_name, v)

    @classmethod
    def _schema_extra(cls, schema: dict) -> None:
        """Publish each rule's bounds in the OpenAPI description (on the non-null branch)."""
        for name, prop in schema.get("properties", {}).items():
            rule = cls.rules.get(name)
            if rule is None or not rule.schema():
                continue
            for branch in (b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"):
                branch.update(rule.schema())


class StreamOptions(_Strict):
    include_usage: bool = False


_TEXT_PARTS = {"type": "array", "items": {"type": "object", "required": ["type", "text"], "properties": {
    "type": {"enum": ["text"]}, "text": {"type": "string"}}}}


class _SamplingFields(_Strict):
    """The sampling parameters shared by completions and chat completions."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Any = Field(None, json_schema_extra={"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]})
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    user: str | None = None
    top_k: int | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    response_format: dict | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list | None = None

    def check(self) -> None:
        """Rules across fields (pydantic would report them without a parameter name)."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "Invalid value for 'stream_options': only allowed when stream is true.",
                           "stream_options")
        given = self.structured_fields()
        if len(given) > 1:
            raise APIError(400, f"Invalid value for '{given[1]}': it cannot be combined with '{given[0]}' "
                           "(one output constraint per request).", given[1])

    def structured_fields(self) -> list[str]:
        """The output-constraining fields this request sets (a text response_format does not count)."""
        return [f for f in STRUCTURED_FIELDS if getattr(self, f) is not None
                and not (f == "response_format" and self.response_format.get("type") == "text")]


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. ``prompt``: a string, a list of token ids, or a list holding one of them."""

    rules: ClassVar[dict] = COMPLETION_RULES

    prompt: Any = Field(..., json_schema_extra={"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "integer"}},
        {"type": "array", "items": {"type": "string"}}, {"type": "array", "items": {"type": "array"}}]})
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


class ChatMessage(_Strict):
    """One chat message; ``content`` may be null or left out only in assistant messages, as in OpenAI's API."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = Field(None, validate_default=True, json_schema_extra={"anyOf": [
        {"type": "string"}, _TEXT_PARTS, {"type": "null"}]})
    name: str | None = None
    tool_calls: list | None = None  # an assistant message's calls (given back to the chat template)
    tool_call_id: str | None = None  # a tool message: the call it answers

    @field_validator("content")
    @classmethod
    def _content(cls, v, info: ValidationInfo):
        if v is None:
            role = info.data.get("role")
            if role in ("assistant", None):  # None: the role itself was invalid and is reported instead
                return ""
            raise ValueError(f"content is required in a {role} message")
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

    rules: ClassVar[dict] = CHAT_RULES

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "Invalid value for 'top_logprobs': it needs logprobs=true.", "top_logprobs")
        choice = self.tool_choice
        if choice in (None, "none", "auto"):
            return
        if not self.tools:
            raise APIError(400, "Invalid value for 'tool_choice': it needs 'tools'.", "tool_choice")
        if isinstance(choice, dict):
            names = [t["function"]["name"] for t in self.tools]
            if choice["function"]["name"] not in names:
                raise APIError(400, f"Invalid value for 'tool_choice': no tool is named "
                               f"{choice['function']['name']!r} (tools: {', '.join(names)}).", "tool_choice")
        if self.structured_fields():
            field = self.structured_fields()[0]
            raise APIError(400, f"Invalid value for '{field}': it cannot be combined with tool_choice "
                           f"{choice if isinstance(choice, str) else 'naming a function'}.", field)

    @property
    def forced_tool_choice(self):
        """tool_choice when it forces a call ("required" or a named function), else None."""
        return self.tool_choice if self.tools and self.tool_choice not in (None, "none", "auto") else None

    @property
    def parses_tool_calls(self) -> bool:
        """Whether the output is read for the model's own tool-call syntax (tools given, tool_choice auto)."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
