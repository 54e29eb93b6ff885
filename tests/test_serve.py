"""``hf-turbo serve``: OpenAI-compatible routes over the fixture model, in process on loopback.

One server (module scope) runs the fixture model on an AsyncEngine; the official ``openai`` client
checks that greedy completions and chat completions equal ``Engine.generate``; httpx sends the bad
requests, drops streams mid-way and runs a short load. Every test ends with no KV block leaked.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import pytest
import torch

import hf_turbo
from hf_turbo.engine import AsyncEngine
from hf_turbo.loading import load_model_and_tokenizer
from hf_turbo.sampling import SamplingParams

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from hf_turbo.serve.app import create_app  # noqa: E402  (needs the serve extra)

MODEL = "fixture"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPTS = ["def add(a, b):\n", "import os\nimport sys\n", "class Stack:\n    def __init__(self):\n"]
CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
NUM_BLOCKS = 128
MAX_BODY = 64 * 1024


class LiveServer:
    """uvicorn in a background thread on a free loopback port (the app's lifespan runs the engine)."""

    def __init__(self, app, config=None) -> None:
        self.server = uvicorn.Server(config or uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def load_fixture_model():
    """The fixture model and its tokenizer, with a chat template."""
    torch.set_num_threads(2)
    model, tok = load_model_and_tokenizer(MODEL, device="cpu")
    tok.chat_template = CHAT_TEMPLATE
    return model, tok


@pytest.fixture(scope="module")
def model_tok():
    return load_fixture_model()


@pytest.fixture(scope="module")
def expected(model_tok):
    """Greedy outputs of the sync Engine, computed before any server runs on the model."""
    model, tok = model_tok
    eng = hf_turbo.Engine(model, tok, num_blocks=NUM_BLOCKS)
    params = SamplingParams(max_new_tokens=8)
    outs = eng.generate(PROMPTS, params, use_tqdm=False)
    chat_ids = tok(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    chat = eng.generate([chat_ids], params, use_tqdm=False)[0]
    return {"completions": [(o.text, len(o.token_ids), len(o.prompt_token_ids)) for o in outs],
            "chat": (chat.text, len(chat.token_ids), len(chat_ids))}


@pytest.fixture(scope="module")
def live(model_tok, expected):
    model, tok = model_tok
    engine = AsyncEngine(model, tok, num_blocks=NUM_BLOCKS)
    app = create_app(engine, MODEL, max_body_bytes=MAX_BODY)
    with LiveServer(app) as srv:
        srv.engine = engine
        yield srv


def wait_idle(engine: AsyncEngine, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle: {stats}")
        time.sleep(0.05)


def assert_no_leak(engine: AsyncEngine) -> None:
    wait_idle(engine)
    pool = engine.engine.pool
    assert pool.num_free == pool.num_blocks, f"{pool.num_blocks - pool.num_free} KV blocks leaked"


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- exactness through the official client ------------------------------------------------------
def test_completions_match_engine(live, expected):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    for prompt, (text, n_new, n_prompt) in zip(PROMPTS, expected["completions"]):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        assert r.choices[0].text == text
        assert r.choices[0].finish_reason in ("stop", "length")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_new)
        assert r.usage.total_tokens == n_prompt + n_new
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_new
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert_no_leak(live.engine)


def test_chat_matches_engine(live, expected):
    text, n_new, n_prompt = expected["chat"]
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_new)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    async def run_async():
        aclient = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        whole = await aclient.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
        parts = []
        async for c in await aclient.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8,
                                                             temperature=0, stream=True):
            parts.append(c.choices[0].delta.content or "")
        comp = await aclient.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        await aclient.close()
        return whole.choices[0].message.content, "".join(parts), comp.choices[0].text

    assert asyncio.run(run_async()) == (text, text, expected["completions"][0][0])
    assert_no_leak(live.engine)


def test_logprobs_stop_seed(live, expected):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text == expected["completions"][0][0][: len(r.choices[0].text)]
    assert all(2 <= len(t) <= 3 and max(t.values()) >= v for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == len(PROMPTS[0])
    c = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob
    # a stop string ends the request and is cut from the text (seeded sampling: varied text)
    # (the first seed whose text has a printable two-character window past its start: seeds are deterministic)
    for seed in range(1, 50):
        kw = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0.8, seed=seed)
        full = client.completions.create(**kw).choices[0].text
        stop = next((w for w in (full[i:i + 2] for i in range(2, len(full) - 1)) if w.isascii() and w.isprintable()
                     and w.strip() == w), None)
        if stop is not None:
            break
    assert stop is not None, "no seeded completion with a usable stop string"
    r = client.completions.create(**kw, stop=[stop, "@@never@@"])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    # seeded sampling is reproducible
    kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=1.0, top_p=0.9, seed=1234)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text
    assert_no_leak(live.engine)


# -- bad requests -------------------------------------------------------------------------------
def _bad_requests() -> list[tuple[str, str, dict, int, str | None]]:
    """(name, route, httpx request kwargs, expected status, expected param)."""
    comp, chat = "/v1/completions", "/v1/chat/completions"
    ok = {"model": MODEL, "prompt": "def f():", "max_tokens": 2}
    okc = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    js = {"content-type": "application/json"}

    def body(route, base, **changes):
        data = {**base, **changes}
        return route, {"json": {k: v for k, v in data.items() if v is not _DROP}}

    def raw(route, content: bytes, headers=None):
        return route, {"content": content, "headers": js if headers is None else headers}

    cases = [
        ("malformed json", *raw(comp, b'{"model": "fixture", "prompt": '), 400, None),
        ("json array", *raw(comp, b'[{"model": "fixture", "prompt": "x"}]'), 400, None),
        ("json string", *raw(comp, b'"hello"'), 400, None),
        ("empty body", *raw(comp, b""), 400, None),
        ("invalid utf-8", *raw(comp, b'{"model": "fixture", "prompt": "\xff\xfe"}'), 400, None),
        ("text/plain", *raw(comp, json.dumps(ok).encode(), {"content-type": "text/plain"}), 415, None),
        ("no content type", *raw(comp, json.dumps(ok).encode(), {}), 415, None),
        ("body too large", *raw(comp, json.dumps({**ok, "prompt": "x" * MAX_BODY}).encode()), 413, None),
        ("missing prompt", *body(comp, ok, prompt=_DROP), 400, "prompt"),
        ("missing model", *body(comp, ok, model=_DROP), 400, "model"),
        ("unknown model", *body(comp, ok, model="gpt-17"), 404, "model"),
        ("empty prompt", *body(comp, ok, prompt=""), 400, "prompt"),
        ("empty token list", *body(comp, ok, prompt=[]), 400, "prompt"),
        ("two prompts", *body(comp, ok, prompt=["a", "b"]), 400, "prompt"),
        ("prompt is a number", *body(comp, ok, prompt=123), 400, "prompt"),
        ("token id out of vocab", *body(comp, ok, prompt=[5, 99999]), 400, "prompt"),
        ("prompt over context", *body(comp, ok, prompt=[7] * 2100), 400, "prompt"),
        ("prompt + max_tokens over context", *body(comp, ok, prompt=[7] * 2000, max_tokens=100), 400, "max_tokens"),
        ("max_tokens 0", *body(comp, ok, max_tokens=0), 400, "max_tokens"),
        ("max_tokens negative", *body(comp, ok, max_tokens=-5), 400, "max_tokens"),
        ("max_tokens string", *body(comp, ok, max_tokens="10"), 400, "max_tokens"),
        ("max_tokens float", *body(comp, ok, max_tokens=1.5), 400, "max_tokens"),
        ("temperature negative", *body(comp, ok, temperature=-0.5), 400, "temperature"),
        ("temperature NaN literal", *raw(comp, b'{"model": "fixture", "prompt": "x", "temperature": NaN}'),
         400, "temperature"),
        ("temperature Infinity", *raw(comp, b'{"model": "fixture", "prompt": "x", "temperature": 1e999}'),
         400, "temperature"),
        ("temperature 'NaN' string", *body(comp, ok, temperature="NaN"), 400, "temperature"),
        ("top_p 0", *body(comp, ok, top_p=0), 400, "top_p"),
        ("top_p 1.5", *body(comp, ok, top_p=1.5), 400, "top_p"),
        ("n over the cap", *body(comp, ok, n=17), 400, "n"),
        ("five stop strings", *body(comp, ok, stop=["a", "b", "c", "d", "e"]), 400, "stop"),
        ("empty stop string", *body(comp, ok, stop=[""]), 400, "stop"),
        ("stop is a number", *body(comp, ok, stop=5), 400, "stop"),
        ("logprobs 50", *body(comp, ok, logprobs=50), 400, "logprobs"),
        ("seed string", *body(comp, ok, seed="abc"), 400, "seed"),
        ("stream string", *body(comp, ok, stream="yes"), 400, "stream"),
        ("stream_options without stream", *body(comp, ok, stream_options={"include_usage": True}),
         400, "stream_options"),
        ("echo", *body(comp, ok, echo=True), 400, "echo"),
        ("presence_penalty 3", *body(comp, ok, presence_penalty=3.0), 400, "presence_penalty"),
        ("min_tokens over max_tokens", *body(comp, ok, min_tokens=5), 400, "min_tokens"),
        ("chat missing messages", *body(chat, okc, messages=_DROP), 400, "messages"),
        ("chat empty messages", *body(chat, okc, messages=[]), 400, "messages"),
        ("chat messages string", *body(chat, okc, messages="hi"), 400, "messages"),
        ("chat bad role", *body(chat, okc, messages=[{"role": "wizard", "content": "hi"}]), 400,
         "messages[0].role"),
        ("chat missing role", *body(chat, okc, messages=[{"content": "hi"}]), 400, "messages[0].role"),
        ("chat content number", *body(chat, okc, messages=[{"role": "user", "content": 5}]), 400,
         "messages[0].content"),
        ("chat image part", *body(chat, okc, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 400, "messages[0].content"),
        ("chat max_completion_tokens 0", *body(chat, okc, max_completion_tokens=0), 400, "max_completion_tokens"),
        ("chat top_logprobs without logprobs", *body(chat, okc, top_logprobs=2), 400, "top_logprobs"),
        ("chat logprobs string", *body(chat, okc, logprobs="yes"), 400, "logprobs"),
        ("chat tools", *body(chat, okc, tools=[{"type": "function"}]), 400, "tools"),
        ("chat n 0", *body(chat, okc, n=0), 400, "n"),
        ("chat temperature 3", *body(chat, okc, temperature=3), 400, "temperature"),
    ]
    return cases


_DROP = object()


def test_bad_requests_get_openai_errors(live):
    cases = _bad_requests()
    assert len(cases) >= 30
    failures = []
    with httpx.Client(base_url=live.url, timeout=30) as client:
        for name, route, kwargs, status, param in cases:
            r = client.post(route, **kwargs)
            try:
                err = r.json()["error"]
                ok = (r.status_code == status and err["param"] == param and isinstance(err["message"], str)
                      and set(err) == {"message", "type", "param", "code"}
                      and (param is None or param in err["message"]))
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                failures.append(f"{name}: got {r.status_code} {r.text[:200]}")
        assert not failures, "\n".join(failures)
        for method, route, status in (("GET", "/nope", 404), ("GET", "/v1/completions", 405),
                                      ("GET", "/v1/models/other", 404)):
            r = client.request(method, route)
            assert r.status_code == status and "message" in r.json()["error"]
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
        text = client.get("/metrics").text
    assert metric(text, 'hf_turbo_http_requests_total{route="/v1/completions",status="400"}') >= 30
    assert_no_leak(live.engine)


# -- disconnects and load -----------------------------------------------------------------------
def test_dropped_streams_are_aborted(live):
    before = live.engine.stats()["requests_aborted"]

    async def client_run(client: httpx.AsyncClient, i: int) -> str:
        drop = i % 2 == 0
        payload = {"model": MODEL, "prompt": PROMPTS[i % 3], "stream": True, "temperature": 0,
                   "max_tokens": 400 if drop else 12, "ignore_eos": True}
        async with client.stream("POST", "/v1/completions", json=payload) as r:
            assert r.status_code == 200
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    n += 1
                    if drop and n >= 2:
                        return "dropped"  # leaving the block closes the connection mid-stream
                    if line == "data: [DONE]":
                        return "done"
        return "truncated"

    async def impatient(i: int) -> str:
        """A non-streaming client that gives up before its long completion is done."""
        payload = {"model": MODEL, "prompt": PROMPTS[i], "temperature": 0, "max_tokens": 400, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=live.url, timeout=1.0) as client:
            try:
                await client.post("/v1/completions", json=payload)
            except httpx.ReadTimeout:
                return "gave up"
        return "answered"

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=60,
                                     limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(client_run(client, i) for i in range(20)), impatient(0), impatient(1))

    results = asyncio.run(main())
    assert results.count("dropped") == 10 and results.count("done") == 10, results
    assert results[-2:] == ["gave up", "gave up"]
    stats = wait_idle(live.engine)
    assert stats["requests_aborted"] - before == 12
    metrics_text = httpx.get(live.url + "/metrics").text
    assert metric(metrics_text, "hf_turbo_engine_requests_aborted_total") >= 12
    assert metric(metrics_text, "hf_turbo_client_disconnects_total") >= 12
    assert_no_leak(live.engine)


def test_load_64_clients_no_5xx(live):
    duration = 3.0
    statuses: list[int] = []
    sent = [0]

    async def worker(client: httpx.AsyncClient, i: int, deadline: float) -> None:
        k = 0
        while time.monotonic() < deadline:
            k += 1
            stream = (i + k) % 2 == 0
            route = "/v1/chat/completions" if (i + k) % 3 == 0 else "/v1/completions"
            payload = {"model": MODEL, "max_tokens": 4, "temperature": 0.7, "stream": stream}
            if route.endswith("chat/completions"):
                payload["messages"] = [{"role": "user", "content": PROMPTS[k % 3]}]
            else:
                payload["prompt"] = PROMPTS[(i + k) % 3]
            sent[0] += 1
            async with client.stream("POST", route, json=payload) as r:
                body = await r.aread()
                statuses.append(r.status_code)
                if stream and r.status_code == 200:
                    assert body.rstrip().endswith(b"data: [DONE]")

    async def main():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=live.url, timeout=60, limits=limits) as client:
            deadline = time.monotonic() + duration
            await asyncio.gather(*(worker(client, i, deadline) for i in range(64)))

    asyncio.run(main())
    assert len(statuses) == sent[0] >= 64
    assert not [s for s in statuses if s >= 500], statuses
    assert set(statuses) == {200}
    assert httpx.get(live.url + "/health").status_code == 200
    assert_no_leak(live.engine)


def test_metrics_exposition(live):
    text = httpx.get(live.url + "/metrics").text
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            value = float(line.rsplit(" ", 1)[1])
            assert not math.isnan(value), line
    for name in ("hf_turbo_http_requests_total", "hf_turbo_generated_tokens_total", "hf_turbo_requests_running",
                 "hf_turbo_requests_waiting", "hf_turbo_kv_blocks", "hf_turbo_kv_cache_usage_ratio",
                 "hf_turbo_prefix_cache_hit_rate", "hf_turbo_time_to_first_token_seconds",
                 "hf_turbo_engine_requests_aborted_total", "hf_turbo_client_disconnects_total"):
        assert name in names, name
    assert metric(text, "hf_turbo_time_to_first_token_seconds_count") >= 1
    assert metric(text, 'hf_turbo_kv_blocks{state="total"}') == NUM_BLOCKS


# -- auth and overload: servers of their own ----------------------------------------------------
def test_api_key(model_tok, live):
    model, tok = model_tok
    engine = AsyncEngine(model, tok, num_blocks=16)
    with LiveServer(create_app(engine, MODEL, api_key="s3cret")) as srv, httpx.Client(base_url=srv.url) as c:
        payload = {"model": MODEL, "prompt": "x", "max_tokens": 2, "temperature": 0}
        assert c.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            for method, route in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions")):
                r = c.request(method, route, headers=headers, json=payload if method == "POST" else None)
                assert r.status_code == 401, (headers, route)
                assert r.json()["error"]["code"] == "invalid_api_key"
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=good).status_code == 200
        assert c.post("/v1/completions", headers=good, json=payload).status_code == 200
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert client.models.list().data[0].id == MODEL
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert_no_leak(engine)


def test_overload_answers_429(model_tok, live):
    model, tok = model_tok
    engine = AsyncEngine(model, tok, num_blocks=64, max_num_seqs=1, max_waiting=1)
    with LiveServer(create_app(engine, MODEL)) as srv:
        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                payload = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0,
                           "ignore_eos": True}
                return await asyncio.gather(*(client.post("/v1/completions", json=payload) for _ in range(6)))

        responses = asyncio.run(main())
        codes = sorted(r.status_code for r in responses)
        assert codes[0] == 200 and codes[-1] == 429, codes
        assert set(codes) <= {200, 429}
        err = next(r for r in responses if r.status_code == 429).json()["error"]
        assert err["code"] == "server_overloaded"
        assert httpx.get(srv.url + "/health").status_code == 200
    assert_no_leak(engine)


def test_cli_parses_serve_and_refuses_bad_flags():
    from hf_turbo.cli import build_parser
    from hf_turbo.serve.cli import build_app

    args = build_parser().parse_args(["serve", "--model", "fixture", "--port", "0", "--api-key", "k",
                                      "--max-batch-tokens", "512", "--max-waiting", "8"])
    assert (args.command, args.host, args.port, args.max_batch_tokens, args.max_waiting) == \
        ("serve", "127.0.0.1", 0, 512, 8)
    for flags, word in ((["--port", "70000"], "--port"), (["--max-waiting", "0"], "--max-waiting"),
                        (["--num-speculative-tokens", "0"], "--num-speculative-tokens"),
                        (["--chat-template", "/no/such/file"], "--chat-template")):
        with pytest.raises(ValueError, match=word):
            build_app(build_parser().parse_args(["serve", *flags]))
