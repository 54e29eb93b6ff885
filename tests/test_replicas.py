"""``hf-turbo serve --replicas 2``: two engine replicas behind Ray Serve on a local Ray instance (CPU).

One deployment (module scope) of the fixture model: 32 concurrent requests are all answered, by both
replicas, with a single engine's tokens; the API key, body limit and per-replica ``/metrics`` hold behind
the proxy; a replica killed under load is restarted by Ray and every client gets an answer or a 5xx with
``Retry-After``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

import pytest
import torch

from hf_turbo import Engine, SamplingParams
from hf_turbo.loading import load_model_and_tokenizer
from hf_turbo.serve.launch import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from hf_turbo.serve import cli  # noqa: E402
from hf_turbo.serve.replicas import APP_NAME, REPLICA_HEADER, start_replicas  # noqa: E402

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = [f"def f{i}(x{i % 3}):" for i in range(32)]


@pytest.fixture(scope="module")
def replicas():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--dtype", "float32", "--replicas", "2", "--port",
                              str(free_port()), "--api-key", KEY, "--max-body-bytes", "4096"])
    url = start_replicas(args)
    yield url
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def reference():
    model, tok = load_model_and_tokenizer("fixture", dtype=torch.float32, device="cpu")
    outs = Engine(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=8, min_new_tokens=8), use_tqdm=False)
    return [o.text for o in outs]


async def _complete_all(url: str, timeout: float = 120, max_tokens: int = 8) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await asyncio.gather(*[
            client.post(url + "/v1/completions", headers=AUTH,
                        json={"model": "fixture", "prompt": p, "max_tokens": max_tokens, "min_tokens": max_tokens,
                              "temperature": 0})
            for p in PROMPTS])


def test_two_replicas_answer_32_concurrent_requests_like_one_engine(replicas, reference):
    responses = asyncio.run(_complete_all(replicas))
    assert [r.status_code for r in responses] == [200] * len(PROMPTS)
    assert [r.json()["choices"][0]["text"] for r in responses] == reference
    served = Counter(r.headers[REPLICA_HEADER] for r in responses)
    assert len(served) == 2, served  # both replicas served some
    # per replica: each /metrics scrape is one replica's, named in its header and in the text
    metrics = httpx.get(replicas + "/metrics", headers=AUTH)
    assert f'hf_turbo_replica_info{{replica="{metrics.headers[REPLICA_HEADER]}"}} 1' in metrics.text
    assert "hf_turbo_completion_tokens_total" in metrics.text


def test_replicas_keep_the_servers_key_and_body_limit(replicas):
    assert httpx.get(replicas + "/v1/models").status_code == 401
    assert httpx.get(replicas + "/v1/models", headers=AUTH).json()["data"][0]["id"] == "fixture"
    big = httpx.post(replicas + "/v1/completions", headers=AUTH,
                     json={"model": "fixture", "prompt": "x" * 5000, "max_tokens": 1})
    assert big.status_code == 413
    assert httpx.get(replicas + "/health").status_code == 200


def _replica_actors() -> list[tuple[str, str]]:
    return sorted((a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::"))


@pytest.mark.slow
def test_killed_replica_is_restarted_and_no_client_hangs(replicas, reference):
    before = _replica_actors()
    assert len(before) == 2
    model, tok = load_model_and_tokenizer("fixture", dtype=torch.float32, device="cpu")
    params = SamplingParams(max_new_tokens=200, min_new_tokens=200)
    longer = [o.text for o in Engine(model, tok).generate(PROMPTS, params, use_tqdm=False)]

    async def load_and_kill():
        task = asyncio.ensure_future(_complete_all(replicas, timeout=90, max_tokens=200))
        await asyncio.sleep(1.0)
        assert not task.done()  # requests are in flight on both replicas when one dies
        name, namespace = before[0]
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        return await task

    responses = asyncio.run(load_and_kill())  # a hung client would fail by the timeout
    for r, want in zip(responses, longer):
        if r.status_code == 200:
            assert r.json()["choices"][0]["text"] == want
        else:
            assert r.status_code >= 500 and "retry-after" in r.headers, (r.status_code, r.headers, r.text)
    print(f"killed replica: {Counter(r.status_code for r in responses)}")
    killed = before[0][0].rsplit("#", 1)[-1]
    deadline = time.monotonic() + 120
    while True:  # Ray replaces the dead replica: two live ids answer, the killed one never
        again = asyncio.run(_complete_all(replicas))
        ids = {r.headers.get(REPLICA_HEADER) for r in again}
        if len(ids) == 2 and killed not in ids:
            break
        assert time.monotonic() < deadline, serve.status().applications[APP_NAME]
        time.sleep(1)
    assert [r.status_code for r in again] == [200] * len(PROMPTS)
    assert [r.json()["choices"][0]["text"] for r in again] == reference
