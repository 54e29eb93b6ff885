"""Fuzzing ``hf-turbo serve`` from its own OpenAPI description (schemathesis), over real HTTP (slow).

schemathesis turns ``/openapi.json`` into request strategies: positive cases (bodies the schema allows)
and negative ones (wrong types, values past the published bounds, bodies that are not JSON), for both
completion routes and the model route; a hostile strategy of ours puts over-long integers, lone
surrogates, NaN and deep nesting into an otherwise valid body. Every response must be below 500, every
4xx must name its field in OpenAI's error shape, nothing may hang, and afterwards no KV block may be
in use and ``/metrics`` must count no 5xx. Bounded by examples and wall time; run with ``-m slow -s``
to see the counts.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
requests = pytest.importorskip("requests")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from test_serve import MODEL, LiveServer, assert_no_leak, load_fixture_model, metric  # noqa: E402

from hf_turbo.engine import AsyncEngine  # noqa: E402
from hf_turbo.serve.app import create_app  # noqa: E402
from hf_turbo.serve.transport import server_config  # noqa: E402

pytestmark = pytest.mark.slow

EXAMPLES = 250  # per (operation, mode)
BUDGET_S = 90.0  # wall time per (operation, mode): past it, remaining examples send nothing
TIMEOUT_S = 60.0  # a request still unanswered after this is a hang
_HOSTILE = [("HUGE_INT", "9" * 5000), ("SURROGATE", '"a\\ud800b"'), ("LOW_SURROGATE", '"\\udfff"'), ("NAN", "NaN"),
            ("INF", "-Infinity"), ("DEEP", "[" * 5000 + "]" * 5000), ("BIGNUM", "1e999"), ("TINY", "1e-320")]


@pytest.fixture(scope="module")
def live():
    model, tok = load_fixture_model()
    # a small KV pool keeps the context (and so the longest generation a fuzzed max_tokens can ask for) short
    engine = AsyncEngine(model, tok, num_blocks=16, max_waiting=64)
    app = create_app(engine, MODEL, max_body_bytes=256 * 1024, body_timeout=5.0)
    with LiveServer(app, server_config(app, host="127.0.0.1", port=0, header_timeout=5.0)) as srv:
        srv.engine, srv.app = engine, app
        yield srv


class Tally:
    """What the fuzzer sent and got back."""

    def __init__(self) -> None:
        self.statuses: Counter = Counter()
        self.hangs = 0
        self.unsatisfiable: list[str] = []
        self.problems: list[str] = []

    def check(self, label: str, body, status: int, payload: bytes) -> None:
        self.statuses[status] += 1
        if status >= 500:
            self.problems.append(f"{label}: {status} for {str(body)[:200]!r}: {payload[:200]!r}")
        elif status >= 400:
            try:
                err = json.loads(payload)["error"]
            except (ValueError, KeyError, TypeError):
                self.problems.append(f"{label}: {status} without an OpenAI error for {str(body)[:200]!r}: "
                                     f"{payload[:200]!r}")
                return
            if err["param"] is not None and err["param"] not in err["message"]:
                self.problems.append(f"{label}: error does not name {err['param']!r}: {err['message'][:200]}")
        elif status == 200 and label.startswith("POST"):
            text = payload.decode()
            if not (text.rstrip().endswith("data: [DONE]") or text.startswith("{") and "choices" in json.loads(text)):
                self.problems.append(f"{label}: malformed 200 {payload[:200]!r}")


def _fuzz(operation, mode, tally: Tally, base_url: str) -> None:
    session = requests.Session()  # one keep-alive connection: an error must not break it for the next case
    deadline = time.monotonic() + BUDGET_S

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        if time.monotonic() > deadline:
            return
        try:
            r = case.call(base_url=base_url, session=session, timeout=TIMEOUT_S)
        except requests.Timeout:
            tally.hangs += 1
            return
        except requests.ConnectionError as exc:  # the server dropped the connection: never acceptable
            tally.problems.append(f"{operation.label}: connection error {exc!r} for {str(case.body)[:200]!r}")
            return
        tally.check(operation.label, case.body, r.status_code, r.content)

    try:
        run()
    except Unsatisfiable:  # no case of this mode exists (a free-form string path parameter has no negatives)
        tally.unsatisfiable.append(f"{operation.label} {mode.value}")
    finally:
        session.close()


def _hostile(tally: Tally, base_url: str) -> None:
    """A valid body with one field replaced by each hostile literal, on both routes, one connection."""
    bodies = {"/v1/completions": {"model": MODEL, "prompt": "def f(x):", "max_tokens": 3},
              "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": 3}}
    fields = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "seed", "logit_bias",
              "presence_penalty", "top_k", "logprobs", "stream", "user", "unknown_field"]

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(sorted(bodies)), field=st.sampled_from(fields), hostile=st.sampled_from(_HOSTILE),
           nested=st.booleans())
    def run(route: str, field: str, hostile: tuple[str, str], nested: bool) -> None:
        name, literal = hostile
        body = dict(bodies[route])
        body[field] = {"x": [name]} if nested else name
        raw = json.dumps(body).replace(f'"{name}"', literal).encode()
        r = client.post(route, content=raw, headers={"content-type": "application/json"})
        tally.check(f"POST {route} (hostile {name} in {field})", raw[:120], r.status_code, r.content)

    with httpx.Client(base_url=base_url, timeout=TIMEOUT_S) as client:
        run()


def test_fuzz_no_5xx_no_hang_no_leak(live):
    schema = schemathesis.openapi.from_dict(live.app.openapi())
    operations = [schema["/v1/completions"]["POST"], schema["/v1/chat/completions"]["POST"],
                  schema["/v1/models/{model_id}"]["GET"]]
    tally = Tally()
    t0 = time.monotonic()
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            _fuzz(operation, mode, tally, live.url)
    _hostile(tally, live.url)
    elapsed = time.monotonic() - t0
    assert_no_leak(live.engine)
    text = httpx.get(live.url + "/metrics").text
    counted_5xx = sum(metric(text, f'hf_turbo_http_requests_total{{route="{route}",status="{code}"}}')
                      for route in ("/v1/completions", "/v1/chat/completions", "/v1/models", "other")
                      for code in range(500, 600))
    kv_used = metric(text, 'hf_turbo_kv_blocks{state="used"}')
    sent = sum(tally.statuses.values()) + tally.hangs
    print(f"\n[serve_fuzz] {sent} requests in {elapsed:.0f} s; statuses {dict(sorted(tally.statuses.items()))}; "
          f"5xx {sum(n for s, n in tally.statuses.items() if s >= 500)} (metrics: {counted_5xx:g}); "
          f"hangs {tally.hangs}; KV blocks in use afterwards {kv_used:g}; no cases for {tally.unsatisfiable}")
    assert not tally.problems, "\n".join(tally.problems[:20])
    assert tally.hangs == 0 and counted_5xx == 0 and kv_used == 0
    assert all(label.startswith("GET") for label in tally.unsatisfiable), tally.unsatisfiable
    assert sent >= 500 and tally.statuses[200] >= 20  # the fuzz reached the engine, not only the validators
