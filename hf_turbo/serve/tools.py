"""Tool calls: the grammar that forces one (``tool_choice`` required or named) and the parsers that read a
model's own tool-call syntax (``tool_choice`` auto), one per chat-template family.

Forced calls are generated under a JSON schema, so they always parse: a named function's output is its
``parameters`` object; ``required`` outputs a JSON array of ``{"name", "arguments"}`` objects, each name
one of the tools. With ``auto``, the model writes its template's syntax and a parser picks the calls out
of the text: ``hermes`` (Qwen 2/2.5/3, Hermes: ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``)
or ``llama3_json`` (Llama 3.1+: ``{"name": ..., "parameters": ...}``, after an optional
``<|python_tag|>``, several separated by ``;``).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

__all__ = ["ToolCall", "ToolParser", "HermesParser", "Llama3JsonParser", "PARSERS", "parser_for_template",
           "forced_schema", "forced_calls", "tool_names"]


@dataclass
class ToolCall:
    """One function call: its name and its arguments as JSON text (OpenAI's ``function.arguments``)."""

    name: str
    arguments: str
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def tool_names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def forced_schema(tools: list[dict], choice, parallel: bool = True) -> dict | None:
    """The JSON schema the output must follow for ``tool_choice`` (None for "none" and "auto"); without
    ``parallel`` (OpenAI's ``parallel_tool_calls=false``) "required" makes exactly one call."""
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        return _parameters(next(t for t in tools if t["function"]["name"] == name))
    if choice != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               "arguments": _parameters(t)},
              "required": ["name", "arguments"]} for t in tools]
    schema = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    return schema if parallel else {**schema, "maxItems": 1}


def forced_calls(text: str, choice) -> list[ToolCall]:
    """The calls of an output generated under :func:`forced_schema` (it parses: the grammar saw to it)."""
    value = json.loads(text)
    if isinstance(choice, dict):
        return [ToolCall(choice["function"]["name"], json.dumps(value))]
    return [ToolCall(c["name"], json.dumps(c["arguments"])) for c in value]


class ToolParser:
    """Finds tool calls in a model's text. ``start`` is the marker that opens the first call: text before it
    is content and may be streamed; from it on the text is held back and parsed when the output ends."""

    name = ""
    start = ""

    def parse(self, text: str, names: list[str]) -> tuple[str | None, list[ToolCall]]:
        """``(content, calls)``; a call to a function not in ``names``, or that does not parse, stays content."""
        raise NotImplementedError

    def safe_prefix(self, text: str) -> int:
        """How many leading characters of ``text`` are content whatever comes next (no call starts in them)."""
        at = text.find(self.start)
        if at >= 0:
            return at
        for k in range(min(len(self.start) - 1, len(text)), 0, -1):  # a marker may be arriving
            if text.endswith(self.start[:k]):
                return len(text) - k
        return len(text)


def _call(obj, names: list[str], args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return ToolCall(obj["name"], json.dumps(args)) if isinstance(args, dict) else None


class HermesParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes, Qwen 2/2.5/3)."""

    name = "hermes"
    start = "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str, names: list[str]) -> tuple[str | None, list[ToolCall]]:
        at = text.find(self.start)
        if at < 0:
            return text, []
        calls = []
        for body in self._block.findall(text[at:]):
            try:
                call = _call(json.loads(body), names, "arguments")
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        content = text[:at].strip()
        return content or None, calls


class Llama3JsonParser(ToolParser):
    """Llama 3.1+ JSON calls: ``{"name": ..., "parameters": {...}}`` (``;``-separated), optionally after
    ``<|python_tag|>``; the whole output is the call(s), else it is content."""

    name = "llama3_json"
    start = "{"

    def parse(self, text: str, names: list[str]) -> tuple[str | None, list[ToolCall]]:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        decoder, calls, pos = json.JSONDecoder(), [], 0
        while pos < len(body):
            try:
                obj, pos = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return text, []
            call = _call(obj, names, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            rest = body[pos:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            pos = len(body) - len(rest)
        return None, calls

    def safe_prefix(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or stripped.startswith(("{", "<|python_tag|>"[:len(stripped)])):
            return 0  # the output may be a call: hold everything
        return len(text)


PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesParser, "llama3_json": Llama3JsonParser}


def parser_for_template(template: str | None, name: str = "auto") -> ToolParser:
    """The parser named ``name``, or for "auto" the one the chat template's syntax implies (hermes when it
    shows neither)."""
    if name != "auto":
        if name not in PARSERS:
            raise ValueError(f"tool_call_parser must be 'auto' or one of {sorted(PARSERS)}, got {name!r}")
        return PARSERS[name]()
    if template and "<tool_call>" not in template and ("<|python_tag|>" in template or "<|eom_id|>" in template):
        return Llama3JsonParser()
    return HermesParser()
