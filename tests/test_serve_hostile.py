"""``hf-turbo serve`` under hostile and careless clients (issue 18), over real HTTP on loopback.

Each case sends the issue's bytes on one raw keep-alive socket, expects a 4xx whose error names the
field (or a correct answer), and then checks that the same connection still answers. The server runs
with the timeouts of :func:`hf_turbo.serve.transport.server_config` set short so slow clients are
cut off quickly. The last test maps OpenAI's penalty fields onto the sampler's, through the official client.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

import hf_turbo
from hf_turbo.engine import AsyncEngine
from hf_turbo.sampling import SamplingParams

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from test_serve import MODEL, LiveServer, assert_no_leak, load_fixture_model, metric  # noqa: E402

from hf_turbo.serve.app import create_app  # noqa: E402
from hf_turbo.serve.rules import SAMPLER_FIELDS  # noqa: E402
from hf_turbo.serve.transport import server_config  # noqa: E402

HEADER_TIMEOUT = 1.0
KEEP_ALIVE = 2.0
BODY_TIMEOUT = 1.0
MAX_BODY = 2 << 20  # room for a 1 MiB prompt plus its JSON
BIG = 1 << 20


class RawConn:
    """One HTTP/1.1 keep-alive connection on a plain socket: the bytes sent are exactly the test's."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> tuple[int, dict, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if body is not None:
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        self.send(head.encode() + b"\r\n" + (body or b""))
        return self.response()

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buf += data

    def response(self) -> tuple[int, dict, bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        n = int(headers.get("content-length", 0))
        while len(self.buf) < n:
            self._fill()
        body, self.buf = self.buf[:n], self.buf[n:]
        return status, headers, body

    def closed_within(self, seconds: float) -> bool:
        """Whether the server closes the connection within ``seconds`` (without sending anything)."""
        self.sock.settimeout(seconds)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True


@pytest.fixture(scope="module")
def live():
    model, tok = load_fixture_model()
    engine = AsyncEngine(model, tok, num_blocks=128)
    app = create_app(engine, MODEL, max_body_bytes=MAX_BODY, body_timeout=BODY_TIMEOUT)
    config = server_config(app, host="127.0.0.1", port=0, header_timeout=HEADER_TIMEOUT,
                           keep_alive_timeout=KEEP_ALIVE)
    with LiveServer(app, config) as srv:
        srv.engine, srv.app, srv.model_tok = engine, app, (model, tok)
        yield srv


def _greedy_text(model_tok, prompt_ids: list[int], n: int) -> str:
    model, tok = model_tok
    return hf_turbo.Engine(model, tok, num_blocks=64).generate([prompt_ids], SamplingParams(max_new_tokens=n),
                                                               use_tqdm=False)[0].text


def _expect_error(conn: RawConn, route: str, body: bytes, status: int, param: str | None) -> dict:
    """Send ``body``, check the OpenAI-shaped error naming ``param``, then that the connection still serves."""
    code, headers, raw = conn.request("POST", route, body)
    err = json.loads(raw)["error"]
    assert (code, err["param"]) == (status, param), (code, raw[:300])
    assert param is None or f"'{param}'" in err["message"]
    assert headers.get("connection") != "close"
    code, _, raw = conn.request("GET", "/health")
    assert (code, json.loads(raw)) == (200, {"status": "ok"})
    return err


# -- issue 18, items 1-3: bodies that used to give 500 -------------------------------------------
def test_long_integers_and_lone_surrogates_get_400(live):
    digits = b"9" * 5000
    comp, chat = "/v1/completions", "/v1/chat/completions"
    conn = RawConn(live.url)
    try:
        # 1: an integer past Python's 4300-digit limit, in an ignored field and in a real one
        _expect_error(conn, comp, b'{"model": "fixture", "prompt": "x", "max_tokens": 2, "foo": ' + digits + b"}",
                      400, "foo")
        _expect_error(conn, comp, b'{"model": "fixture", "prompt": "x", "max_tokens": ' + digits + b"}",
                      400, "max_tokens")
        _expect_error(conn, chat, b'{"model": "fixture", "messages": [{"role": "user", "content": "hi"}], '
                      b'"logit_bias": {"5": ' + digits + b"}}", 400, "logit_bias.5")
        # 2: a lone surrogate escape in the prompt and in a chat message
        _expect_error(conn, comp, b'{"model": "fixture", "prompt": "ab\\ud800cd", "max_tokens": 2}', 400, "prompt")
        _expect_error(conn, comp, b'{"model": "fixture", "prompt": ["\\udfff"], "max_tokens": 2}', 400, "prompt[0]")
        _expect_error(conn, chat, b'{"model": "fixture", "messages": [{"role": "system", "content": "ok"}, '
                      b'{"role": "user", "content": "\\ud800"}]}', 400, "messages[1].content")
        # 3: ... and in `model`, which the 404 used to echo (a plain-text 500 and a reset connection)
        _expect_error(conn, comp, b'{"model": "\\ud800", "prompt": "x"}', 400, "model")
        _expect_error(conn, comp, b'{"model": "fix\\udc80ture", "prompt": "x"}', 400, "model")
        _expect_error(conn, comp, b'{"model": "fixture", "prompt": "x", "\\ud800": 1}', 400, None)  # in a key
        # a surrogate pair is one valid character: served (a 404 for the unknown model name, echoed intact)
        code, _, raw = conn.request("POST", comp, b'{"model": "\\ud83d\\ude00", "prompt": "x"}')
        assert code == 404 and "\U0001f600" in json.loads(raw)["error"]["message"]
        code, _, raw = conn.request("POST", comp, b'{"model": "fixture", "prompt": "\\ud83d\\ude00", "max_tokens": 2, '
                                  b'"ignore_eos": true}')  # sampled: an early EOS is not the point here
        assert code == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2
    finally:
        conn.close()
    assert_no_leak(live.engine)


def test_unexpected_errors_are_counted_json_500s(live, monkeypatch):
    """An error that escapes a handler is a JSON 500 in /metrics, and the connection stays usable."""
    server = live.app.state.hf_turbo

    def broken(*_args):
        raise RuntimeError("injected failure")

    before = metric(httpx.get(live.url + "/metrics").text, "hf_turbo_http_requests_total")
    monkeypatch.setattr(server.preparer, "prepare", broken)  # inside the generation handler
    monkeypatch.setattr(server, "model_card", broken)  # escapes the /v1/models route itself
    conn = RawConn(live.url)
    try:
        for method, route, body in (("POST", "/v1/completions", b'{"model": "fixture", "prompt": "x"}'),
                                    ("GET", "/v1/models", None)):
            code, headers, raw = conn.request(method, route, body)
            assert code == 500 and headers["content-type"] == "application/json", raw
            assert json.loads(raw)["error"]["type"] == "server_error"
            assert conn.request("GET", "/health")[0] == 200
    finally:
        conn.close()
    monkeypatch.undo()
    text = httpx.get(live.url + "/metrics").text
    assert metric(text, 'hf_turbo_http_requests_total{route="/v1/completions",status="500"}') >= 1
    assert metric(text, 'hf_turbo_http_requests_total{route="/v1/models",status="500"}') >= 1
    assert metric(text, "hf_turbo_http_requests_total") >= before + 4


# -- item 4: big prompts off the event loop ------------------------------------------------------
def test_health_and_streams_flow_while_1mib_prompts_are_tokenized(live, capsys):
    big_prompt = json.dumps({"model": MODEL, "prompt": "def f(x):\n    return x\n" * (BIG // 24 + 1)}).encode()
    big_chat = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}] * 20_000}).encode()
    assert len(big_prompt) > BIG and len(big_chat) < MAX_BODY

    async def big(client: httpx.AsyncClient, body: bytes):
        r = await client.post("/v1/chat/completions" if b'"messages"' in body else "/v1/completions", content=body,
                              headers={"content-type": "application/json"})
        return r.status_code, r.json()["error"]["param"]

    async def stream(client: httpx.AsyncClient, gaps: list[float]) -> str:
        payload = {"model": MODEL, "prompt": "import os\n", "max_tokens": 120, "temperature": 0, "ignore_eos": True,
                   "stream": True}
        last, text = None, []
        async with client.stream("POST", "/v1/completions", json=payload) as r:
            async for line in r.aiter_lines():
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
                if line.startswith("data: {"):
                    text.append(json.loads(line[6:])["choices"][0]["text"])
        return "".join(text)

    async def probe(client: httpx.AsyncClient, stop: asyncio.Event, latencies: list[float]) -> None:
        while not stop.is_set():
            t = time.perf_counter()
            assert (await client.get("/health")).status_code == 200
            latencies.append(time.perf_counter() - t)
            await asyncio.sleep(0.02)

    async def main():
        gaps, latencies, stop = [], [], asyncio.Event()
        # idle connections are dropped before the server's keep-alive timeout would race a reuse
        limits = httpx.Limits(keepalive_expiry=KEEP_ALIVE / 4)
        async with httpx.AsyncClient(base_url=live.url, timeout=120, limits=limits) as client:
            streaming = asyncio.ensure_future(stream(client, gaps))
            await asyncio.sleep(0.2)  # the stream is running before the big bodies arrive
            prober = asyncio.ensure_future(probe(client, stop, latencies))
            t0 = time.perf_counter()
            rejected = await asyncio.gather(*(big(client, big_prompt) for _ in range(4)), big(client, big_chat))
            busy = time.perf_counter() - t0
            stop.set()
            await prober
            return rejected, await streaming, gaps, latencies, busy

    rejected, text, gaps, latencies, busy = asyncio.run(main())
    assert rejected == [(400, "prompt")] * 4 + [(400, "messages")]
    with capsys.disabled():
        print(f"\n[serve_hostile] 4 x 1 MiB prompts + a 20,000-message chat rejected in {busy:.2f} s; "
              f"/health: {len(latencies)} probes, p95 {sorted(latencies)[int(0.95 * len(latencies))] * 1000:.1f} ms, "
              f"max {max(latencies) * 1000:.1f} ms; "
              f"largest gap between stream events {max(gaps) * 1000:.1f} ms")
    # loose (a 2-core box shared with other jobs): the issue saw 2.4-5.9 s with the tokenizer on the event loop
    assert len(latencies) >= 10
    assert sorted(latencies)[int(0.95 * len(latencies))] < 0.25 and max(latencies) < 1.0
    assert text and max(gaps) < 2.0  # loose: the stream kept flowing (it stalled for seconds with the prompts
    # tokenized side by side on every core)
    assert_no_leak(live.engine)


# -- items 5 and 6: temperature floor, content null ----------------------------------------------
def test_tiny_temperature_is_refused_and_the_floor_samples_correctly(live):
    conn = RawConn(live.url)
    try:
        for t in (b"1e-39", b"1e-45", b"5e-324", b"9.9e-7"):
            err = _expect_error(conn, "/v1/completions", b'{"model": "fixture", "prompt": "def add(a, b):\\n", '
                                b'"max_tokens": 8, "temperature": ' + t + b"}", 400, "temperature")
            assert "greedy" in err["message"]
        # at the floor the distribution is one-hot on the argmax here: the greedy text, not token 0 forever
        code, _, raw = conn.request("POST", "/v1/completions", b'{"model": "fixture", "prompt": "def add(a, b):\\n", '
                                    b'"max_tokens": 8, "temperature": 1e-6, "seed": 3, "ignore_eos": true}')
    finally:
        conn.close()
    choice = json.loads(raw)["choices"][0]
    tok = live.model_tok[1]
    assert code == 200 and choice["finish_reason"] == "length"
    assert choice["text"] == _greedy_text(live.model_tok, tok("def add(a, b):\n")["input_ids"], 8)
    assert_no_leak(live.engine)


def test_assistant_content_null_is_accepted(live):
    conn = RawConn(live.url)
    base = b'{"model": "fixture", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "hi"}, '
    try:
        code, _, with_null = conn.request("POST", "/v1/chat/completions",
                                          base + b'{"role": "assistant", "content": null}]}')
        assert code == 200, with_null
        code, _, omitted = conn.request("POST", "/v1/chat/completions", base + b'{"role": "assistant"}]}')
        assert code == 200
        texts = [json.loads(r)["choices"][0]["message"]["content"] for r in (with_null, omitted)]
        assert texts[0] == texts[1] and json.loads(with_null)["usage"] == json.loads(omitted)["usage"]
        # OpenAI requires content in the other roles: null there is still a 400 naming the field
        _expect_error(conn, "/v1/chat/completions", b'{"model": "fixture", "messages": [{"role": "user", '
                      b'"content": null}]}', 400, "messages[0].content")
        _expect_error(conn, "/v1/chat/completions", b'{"model": "fixture", "messages": [{"role": "system", '
                      b'"content": "x"}, {"role": "user"}]}', 400, "messages[1].content")
    finally:
        conn.close()
    assert_no_leak(live.engine)


# -- item 7: slow clients, Retry-After -----------------------------------------------------------
def test_slow_clients_are_cut_off(live):
    limit = HEADER_TIMEOUT + 4.0  # loose: the deadline plus scheduling on a loaded box
    # never finishes its headers
    conn = RawConn(live.url)
    conn.send(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
    assert conn.closed_within(limit)
    conn.close()
    # connects and sends nothing
    conn = RawConn(live.url)
    assert conn.closed_within(limit)
    conn.close()
    # a served connection that starts its next request and stalls
    conn = RawConn(live.url)
    assert conn.request("GET", "/health")[0] == 200
    conn.send(b"GET /health HTTP/1.1\r\nHo")
    assert conn.closed_within(limit)
    conn.close()
    # an idle keep-alive connection
    conn = RawConn(live.url)
    assert conn.request("GET", "/health")[0] == 200
    assert conn.closed_within(KEEP_ALIVE + 4.0)
    conn.close()
    # sends its headers but trickles the body: 408 after the body deadline
    conn = RawConn(live.url)
    conn.send(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"model\": ")
    code, headers, raw = conn.response()
    assert code == 408 and headers.get("connection") == "close" and json.loads(raw)["error"]["message"]
    conn.close()
    # a request that does finish its headers in time is served, however long it then runs
    conn = RawConn(live.url)
    code, _, raw = conn.request("POST", "/v1/completions", b'{"model": "fixture", "prompt": "x", "max_tokens": 40, '
                                b'"ignore_eos": true}')
    assert code == 200 and json.loads(raw)["usage"]["completion_tokens"] == 40
    conn.close()
    assert httpx.get(live.url + "/health").status_code == 200
    assert_no_leak(live.engine)


def test_429_carries_retry_after(live):
    model, tok = live.model_tok
    engine = AsyncEngine(model, tok, num_blocks=64, max_num_seqs=1, max_waiting=1)
    app = create_app(engine, MODEL)
    with LiveServer(app, server_config(app, host="127.0.0.1", port=0)) as srv:
        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                payload = {"model": MODEL, "prompt": "import os\n", "max_tokens": 24, "temperature": 0,
                           "ignore_eos": True}
                return await asyncio.gather(*(client.post("/v1/completions", json=payload) for _ in range(6)))

        responses = asyncio.run(main())
        refused = [r for r in responses if r.status_code == 429]
        assert refused and all(r.status_code in (200, 429) for r in responses)
        assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "server_overloaded"
                   for r in refused)
    assert_no_leak(engine)


def test_openapi_describes_the_request_models(live):
    spec = httpx.get(live.url + "/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for route, model in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        body = spec["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        assert {"model", "temperature", "max_tokens"} <= set(schemas[model]["properties"])
    temperature = schemas["CompletionRequest"]["properties"]["temperature"]["anyOf"][0]
    assert (temperature["minimum"], temperature["maximum"]) == (0.0, 2.0)
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1


def test_server_config_refuses_bad_timeouts():
    for kwargs, word in (({"header_timeout": 0}, "header_timeout"), ({"keep_alive_timeout": -1}, "keep_alive"),
                         ({"header_timeout": float("nan")}, "header_timeout")):
        with pytest.raises(ValueError, match=word):
            server_config(None, **kwargs)
    from hf_turbo.cli import build_parser
    from hf_turbo.serve.cli import build_app

    args = build_parser().parse_args(["serve", "--header-timeout", "2.5", "--body-timeout", "9"])
    assert (args.header_timeout, args.keep_alive_timeout, args.body_timeout) == (2.5, 5.0, 9.0)
    for flag in ("--header-timeout", "--keep-alive-timeout", "--body-timeout"):
        for value in ("0", "-1", "nan"):
            with pytest.raises(ValueError, match=flag):
                build_app(build_parser().parse_args(["serve", flag, value]))
    with pytest.raises(ValueError, match="body_timeout"):
        create_app(None, MODEL, body_timeout=0)


# -- OpenAI's penalty fields, mapped onto the sampler's ------------------------------------------
@pytest.mark.skipif(not {"presence_penalty", "frequency_penalty", "logit_bias"} <= SAMPLER_FIELDS,
                    reason="SamplingParams has no OpenAI penalties yet (the server refuses them)")
def test_penalties_and_logit_bias_match_the_engine(live):
    openai = pytest.importorskip("openai")
    model, tok = live.model_tok
    prompt = "import os\nimport sys\n"  # greedy continues with a run of newlines: penalties must break it
    ids = tok(prompt)["input_ids"]
    newline = tok("\n", add_special_tokens=False)["input_ids"][-1]
    cases = [{}, {"frequency_penalty": 2.0}, {"presence_penalty": 1.5, "frequency_penalty": -0.5},
             {"logit_bias": {newline: -100.0}}, {"logit_bias": {7: 100.0}, "presence_penalty": 0.5}]
    engine = hf_turbo.Engine(model, tok, num_blocks=64)
    expected = [engine.generate([ids], SamplingParams(max_new_tokens=8, **kw), use_tqdm=False)[0].text for kw in cases]
    assert len(set(expected)) == len(cases)  # each setting changes the greedy text
    assert expected[-1] == tok.decode([7] * 8)
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    for kw, text in zip(cases, expected):
        wire = {**kw, "logit_bias": {str(t): b for t, b in kw["logit_bias"].items()}} if "logit_bias" in kw else kw
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, **wire)
        assert r.choices[0].text == text, kw
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          temperature=0, logit_bias={"7": 100})
    assert chat.choices[0].message.content == tok.decode([7] * 3)
    conn = RawConn(live.url)
    try:
        for bias in (b'{"abc": 1}', b'{"-1": 1}', b'{"99999": 1}', b'{"5": 101}', b'{"5": "1"}', b'{"5": NaN}'):
            _expect_error(conn, "/v1/completions", b'{"model": "fixture", "prompt": "x", "logit_bias": ' + bias + b"}",
                          400, "logit_bias")
        for name in (b"presence_penalty", b"frequency_penalty"):
            _expect_error(conn, "/v1/completions", b'{"model": "fixture", "prompt": "x", "' + name + b'": -2.5}',
                          400, name.decode())
    finally:
        conn.close()
    assert_no_leak(live.engine)
