"""The request parameters' value rules, as one table per route.

Each rule is a small callable ``rule(param, value) -> value`` that raises ``ValueError`` with a message
naming ``param``, plus the JSON-schema keywords that describe it (so the OpenAPI description the
server publishes states the same bounds the server enforces). The request models apply the table to
every field that is present and not null; types are checked before, by pydantic in strict mode.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

from hf_turbo.sampling import SamplingParams

__all__ = ["Interval", "Only", "Unsupported", "Check", "SAMPLING_RULES", "COMPLETION_RULES", "CHAT_RULES",
           "MIN_TEMPERATURE", "MAX_STOP", "MAX_LOGPROBS", "MAX_N", "SAMPLER_FIELDS", "STRUCTURED_FIELDS"]

MAX_STOP = 4
MAX_LOGPROBS = 20
MAX_N = 16  # choices per request: each is a sequence in the batch
# the request fields that constrain the output (at most one per request; tool_choice required/named too)
STRUCTURED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_grammar", "guided_choice")
# Below this, logits / temperature can overflow float32 to inf (and the softmax to NaN) for logits of
# ordinary size; 0 (greedy) is the way to ask for the limit. 1e-6 keeps |logit| < 3e32 finite.
MIN_TEMPERATURE = 1e-6
# The OpenAI penalties and logit_bias map onto SamplingParams when the sampler has them; refused otherwise.
SAMPLER_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
_TOKEN_ID = re.compile(r"[0-9]{1,10}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Interval:
    """A finite number in [lo, hi] (either side open-ended when None; ``lo_open`` excludes lo)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def __call__(self, name: str, v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v}")
        below = self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo))
        above = self.hi is not None and v > self.hi
        if below or above:
            raise ValueError(f"{name} must be {self.describe()}, got {v}")
        return v

    def describe(self) -> str:
        if self.hi is None:
            return f"> {self.lo}" if self.lo_open else f"at least {self.lo}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}]"

    def schema(self) -> dict:
        out: dict = {}
        if self.lo is not None:
            out["exclusiveMinimum" if self.lo_open else "minimum"] = self.lo
        if self.hi is not None:
            out["maximum"] = self.hi
        return out


@dataclasses.dataclass(frozen=True)
class Only:
    """One of a few allowed values (what we support of a wider OpenAI parameter)."""

    allowed: tuple

    def __call__(self, name: str, v: Any) -> Any:
        if v not in self.allowed or isinstance(v, bool) != isinstance(self.allowed[0], bool):
            shown = " or ".join(repr(a) for a in self.allowed)
            raise ValueError(f"only {name}={shown} is supported, got {name}={v!r}")
        return v

    def schema(self) -> dict:
        return {"enum": list(self.allowed)}


@dataclasses.dataclass(frozen=True)
class Unsupported:
    """A parameter we do not implement: only its empty/false value is accepted."""

    def __call__(self, name: str, v: Any) -> Any:
        if v:
            raise ValueError(f"{name} is not supported")
        return v

    def schema(self) -> dict:
        return {}


@dataclasses.dataclass(frozen=True)
class Check:
    """Any other rule: a function ``(name, value) -> value`` and the schema keywords it implies."""

    fn: Callable[[str, Any], Any]
    keywords: dict = dataclasses.field(default_factory=dict)

    def __call__(self, name: str, v: Any) -> Any:
        return self.fn(name, v)

    def schema(self) -> dict:
        return dict(self.keywords)


def _temperature(name: str, v: Any) -> Any:
    Interval(0.0, 2.0)(name, v)
    if 0 < v < MIN_TEMPERATURE:
        raise ValueError(f"{name} must be 0 (greedy) or at least {MIN_TEMPERATURE}: smaller values overflow "
                         f"the logits, got {v}")
    return v


def _stop(name: str, v: Any) -> tuple[str, ...]:
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or any(not isinstance(s, str) for s in stops):
        raise ValueError(f"{name} must be a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise ValueError(f"{name} takes at most {MAX_STOP} strings, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError(f"{name} strings must not be empty")
    return tuple(stops)


def _top_k(name: str, v: Any) -> Any:
    if v < 0 and v != -1:
        raise ValueError(f"{name} must be >= 0 (or -1 to disable it), got {v}")
    return v


def _logit_bias(name: str, v: dict) -> dict[int, float]:
    if "logit_bias" not in SAMPLER_FIELDS:
        return Unsupported()(name, v)
    out = {}
    for key, bias in v.items():
        if not _TOKEN_ID.fullmatch(key):
            raise ValueError(f"{name} keys must be token ids (decimal strings), got {key!r}")
        if not _number(bias) or not math.isfinite(bias) or not -100 <= bias <= 100:
            raise ValueError(f"{name}[{key!r}] must be a number in [-100, 100], got {bias!r}")
        out[int(key)] = float(bias)
    return out


def _penalty(name: str, v: Any) -> Any:
    if name in SAMPLER_FIELDS:
        return Interval(-2.0, 2.0)(name, v)
    if v != 0:
        raise ValueError(f"{name} is not supported (only 0), got {v}")
    return v


def _messages(name: str, v: list) -> list:
    if not v:
        raise ValueError(f"{name} must hold at least one message")
    return v


def _response_format(name: str, v: dict) -> dict:
    kind = v.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise ValueError(f"{name}.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    if kind == "json_schema":
        spec = v.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ValueError(f"{name}.json_schema must be an object with a 'name' and a 'schema'")
        if not isinstance(spec.get("schema", {}), dict):
            raise ValueError(f"{name}.json_schema.schema must be a JSON schema object")
        if not isinstance(spec.get("strict", False), (bool, type(None))):
            raise ValueError(f"{name}.json_schema.strict must be a boolean")
    return v


def _guided_json(name: str, v: Any) -> Any:
    if not isinstance(v, (dict, str)):
        raise ValueError(f"{name} must be a JSON schema (an object or its JSON text)")
    return v


def _nonempty_text(name: str, v: Any) -> Any:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{name} must be a non-empty string")
    return v


def _guided_choice(name: str, v: Any) -> Any:
    if not isinstance(v, list) or not v or any(not isinstance(c, str) or not c for c in v):
        raise ValueError(f"{name} must be a non-empty list of non-empty strings")
    return v


def _tools(name: str, v: list) -> list:
    seen = set()
    for i, tool in enumerate(v):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ValueError(f"{name}[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        if not isinstance(fn.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", fn["name"]):
            raise ValueError(f"{name}[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'")
        if fn["name"] in seen:
            raise ValueError(f"{name}[{i}].function.name {fn['name']!r} is given twice")
        seen.add(fn["name"])
        if not isinstance(fn.get("parameters", {}), dict):
            raise ValueError(f"{name}[{i}].function.parameters must be a JSON schema object")
    return v


def _tool_choice(name: str, v: Any) -> Any:
    if v in ("none", "auto", "required"):
        return v
    fn = v.get("function") if isinstance(v, dict) else None
    if not isinstance(v, dict) or v.get("type") != "function" or not isinstance(fn, dict) \
            or not isinstance(fn.get("name"), str):
        raise ValueError(f"{name} must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                         "{'name': ...}}")
    return v


_PENALTY = Check(_penalty, {"minimum": -2.0, "maximum": 2.0} if "presence_penalty" in SAMPLER_FIELDS else {"enum": [0]})
_LOGPROBS = Interval(0, MAX_LOGPROBS)
_LOGIT_BIAS_SCHEMA = {"propertyNames": {"pattern": "^[0-9]{1,10}$"}, "additionalProperties": {
    "type": "number", "minimum": -100, "maximum": 100}} if "logit_bias" in SAMPLER_FIELDS else {"maxProperties": 0}

# Parameters of both routes. Values are checked only when present and not null.
SAMPLING_RULES: dict[str, Any] = {
    "max_tokens": Interval(1),
    "temperature": Check(_temperature, {"minimum": 0.0, "maximum": 2.0}),
    "top_p": Interval(0.0, 1.0, lo_open=True),
    "n": Interval(1, MAX_N),
    "stop": Check(_stop),
    "presence_penalty": _PENALTY,
    "frequency_penalty": _PENALTY,
    "logit_bias": Check(_logit_bias, _LOGIT_BIAS_SCHEMA),
    "top_k": Check(_top_k, {"minimum": -1}),
    "min_tokens": Interval(0),
    "repetition_penalty": Interval(0.0, lo_open=True),
    "response_format": Check(_response_format),
    "guided_json": Check(_guided_json),
    "guided_regex": Check(_nonempty_text),
    "guided_grammar": Check(_nonempty_text),
    "guided_choice": Check(_guided_choice, {"minItems": 1}),
}
COMPLETION_RULES: dict[str, Any] = {
    **SAMPLING_RULES,
    "logprobs": _LOGPROBS,
    "echo": Unsupported(),
    "best_of": Only((1,)),
    "suffix": Unsupported(),
}
CHAT_RULES: dict[str, Any] = {
    **SAMPLING_RULES,
    "messages": Check(_messages, {"minItems": 1}),
    "max_completion_tokens": Interval(1),
    "top_logprobs": _LOGPROBS,
    "tools": Check(_tools),
    "tool_choice": Check(_tool_choice),
}
