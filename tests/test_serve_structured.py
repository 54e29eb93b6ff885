"""Structured output, n > 1 and tool calls through ``hf-turbo serve`` with the official ``openai`` client.

One server over the fixture model, with a chat template that renders tools Hermes-style. Sampled
JSON-schema outputs always validate, regex and choice outputs always match, ``n`` choices are
reproducible and equal to their single-sample requests, forced tool calls always parse (streaming and
not), ``tool_choice`` auto reads a Hermes-style reply, and bad input gets a 400 naming the field while
the engine keeps serving. Every test ends with no KV block leaked.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from hf_turbo.engine import AsyncEngine

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from test_serve import MODEL, LiveServer, load_fixture_model, wait_idle  # noqa: E402

from hf_turbo.serve.app import create_app  # noqa: E402
from hf_turbo.serve.tools import HermesParser, Llama3JsonParser  # noqa: E402

TOOLS_TEMPLATE = ("{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
                  "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                  "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>"
                  "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "count": {"type": "integer", "minimum": 0, "maximum": 99},
    "color": {"enum": ["red", "green", "blue"]},
    "sizes": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "maxItems": 3},
    "meta": {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 5}},
             "required": ["ok", "note"], "additionalProperties": False}},
    "required": ["name", "count", "color", "sizes", "meta"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}}, "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def live():
    model, tok = load_fixture_model()
    tok.chat_template = TOOLS_TEMPLATE
    engine = AsyncEngine(model, tok, num_blocks=256)
    with LiveServer(create_app(engine, MODEL)) as srv:
        srv.engine = engine
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        yield srv


def no_leak(live) -> None:
    stats = wait_idle(live.engine)
    assert stats["kv_blocks_used"] == 0, stats


def _many(fn, items):
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(fn, items))


def test_json_schema_over_20_seeds_always_validates(live):
    def ask(seed):
        return live.client.chat.completions.create(
            model=MODEL, messages=ASK, temperature=1.0, seed=seed, max_tokens=250,
            response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA,
                                                                     "strict": True}})
    outs = _many(ask, range(20))
    values = []
    for r in outs:
        assert r.choices[0].finish_reason == "stop"
        values.append(json.loads(r.choices[0].message.content))
        jsonschema.validate(values[-1], SCHEMA)
    assert len({json.dumps(v) for v in values}) > 5  # sampled, not one answer
    no_leak(live)


def test_json_object_parses_and_regex_choice_match(live):
    def obj(seed):
        return live.client.chat.completions.create(model=MODEL, messages=ASK, temperature=0.7, seed=seed,
                                                   max_tokens=400, response_format={"type": "json_object"})
    for r in _many(obj, range(6)):
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)

    def regex(seed):
        return live.client.completions.create(model=MODEL, prompt="x = ", temperature=1.0, seed=seed, max_tokens=20,
                                              extra_body={"guided_regex": r"[0-9]{2,4}-[a-z]{1,3}"})

    def choice(seed):
        return live.client.completions.create(model=MODEL, prompt="x = ", temperature=1.0, seed=seed, max_tokens=20,
                                              extra_body={"guided_choice": ["list", "text", "all", "link", "set"]})
    texts = [r.choices[0].text for r in _many(regex, range(10))]
    assert all(re.fullmatch(r"[0-9]{2,4}-[a-z]{1,3}", t) for t in texts), texts
    picks = [r.choices[0].text for r in _many(choice, range(10))]
    assert set(picks) <= {"list", "text", "all", "link", "set"} and len(set(picks)) > 1
    no_leak(live)


def test_n_choices_reproducible_and_each_equal_to_its_seed_alone(live):
    kw = dict(model=MODEL, prompt="def add(a, b):\n", temperature=1.0, max_tokens=12)
    first = live.client.completions.create(n=4, seed=21, **kw)
    again = live.client.completions.create(n=4, seed=21, **kw)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert len(texts) == 4 and [c.index for c in first.choices] == [0, 1, 2, 3]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    alone = [live.client.completions.create(seed=21 + i, **kw) for i in range(4)]
    assert texts == [r.choices[0].text for r in alone] and len(set(texts)) > 1
    assert first.usage.completion_tokens == sum(r.usage.completion_tokens for r in alone)
    assert first.usage.prompt_tokens == alone[0].usage.prompt_tokens
    chunks = live.client.chat.completions.create(model=MODEL, messages=ASK, n=2, seed=5, temperature=1.0,
                                                 max_tokens=8, stream=True)
    got = {0: "", 1: ""}
    for ch in chunks:
        for c in ch.choices:
            got[c.index] += c.delta.content or ""
    whole = live.client.chat.completions.create(model=MODEL, messages=ASK, n=2, seed=5, temperature=1.0, max_tokens=8)
    assert [got[0], got[1]] == [c.message.content for c in whole.choices]
    no_leak(live)


def _check_calls(calls, names):
    assert calls
    for call in calls:
        assert call.function.name in names
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, WEATHER if call.function.name == "get_weather" else TIME)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_parse_streaming_and_not(live, choice):
    names = ["get_time"] if isinstance(choice, dict) else ["get_weather", "get_time"]
    for seed in range(3):
        r = live.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                                temperature=1.0, seed=seed, max_tokens=120, parallel_tool_calls=False)
        msg = r.choices[0].message
        _check_calls(msg.tool_calls, names)
        assert msg.content is None
        assert r.choices[0].finish_reason == ("stop" if isinstance(choice, dict) else "tool_calls")
        stream = live.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                                     temperature=1.0, seed=seed, max_tokens=120, stream=True,
                                                     parallel_tool_calls=False)
        deltas = [c.choices[0] for c in stream if c.choices]
        streamed = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
        assert not "".join(d.delta.content or "" for d in deltas)
        assert [(t.function.name, t.function.arguments) for t in streamed] == \
            [(t.function.name, t.function.arguments) for t in msg.tool_calls]
    no_leak(live)


HERMES_REPLY = 'Let me look.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>'


def test_auto_reads_a_hermes_style_reply(live):
    # the output is forced to a hand-written Hermes reply; tool_choice auto must read the call out of it
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto", max_tokens=300,
              extra_body={"guided_choice": [HERMES_REPLY]})
    r = live.client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert msg.content == "Let me look." and r.choices[0].finish_reason == "tool_calls"
    _check_calls(msg.tool_calls, ["get_weather"])
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris", "unit": "c"}
    deltas = [c.choices[0] for c in live.client.chat.completions.create(**kw, stream=True) if c.choices]
    assert "".join(d.delta.content or "" for d in deltas) == "Let me look."
    assert [t.function.name for d in deltas for t in (d.delta.tool_calls or [])] == ["get_weather"]
    plain = live.client.chat.completions.create(**{**kw, "extra_body": {"guided_choice": ["No tools needed."]}})
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content == "No tools needed."
    no_leak(live)


def test_parsers_on_hand_written_replies():
    names = ["get_weather", "get_time"]
    content, calls = HermesParser().parse(HERMES_REPLY + '\n<tool_call>\n{"name": "get_time", "arguments": '
                                          '{"zone": "UTC"}}\n</tool_call>', names)
    assert content == "Let me look." and [c.name for c in calls] == ["get_weather", "get_time"]
    assert HermesParser().parse('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', names)[1] == []
    assert HermesParser().safe_prefix("Hi <tool_") == 3
    content, calls = Llama3JsonParser().parse('<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}; '
                                              '{"name": "get_weather", "parameters": {"city": "Oslo"}}', names)
    assert content is None and [json.loads(c.arguments) for c in calls] == [{"zone": "UTC"}, {"city": "Oslo"}]
    assert Llama3JsonParser().parse("The answer is 4.", names) == ("The answer is 4.", [])


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format"),
    ({"guided_regex": "(ab"}, "guided_regex"),
    ({"guided_grammar": "root ::= "}, "guided_grammar"),
    ({"n": 17}, "n"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
])
def test_bad_structured_input_gets_400_naming_the_field(live, body, param):
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]
    ok = live.client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")
    no_leak(live)
