"""8-bit KV cache (CacheConfig.kv_dtype): quantization bounds, accuracy against the float cache, exactness of the
8-bit engine with respect to itself, pool sizing, the backend choice, and the server flag."""

from __future__ import annotations

import functools
import logging
import math

import pytest
import torch

import hf_turbo
from hf_turbo import Engine, SamplingParams, TurboConfig
from hf_turbo.backends import resolve_backend, store_kv
from hf_turbo.backends.kv_quant import KV_QUANT, dequantize_kv, kv_bytes_per_token_head, quantize_kv
from hf_turbo.cache.paged_cache import PagedKVCache
from hf_turbo.config import CacheConfig
from hf_turbo.engine.memory import num_kv_blocks
from hf_turbo.eval.runner import turbo_logprobs
from hf_turbo.testing import tiny_model

KV8 = tuple(KV_QUANT)

# Round trip |x - dequantize(quantize(x))| per (token, head) row with amax = max |x| (measured on 4096 x 8 rows
# of D = 128 over 8 decades: int8 3.937e-3 amax, fp8_e4m3 3.571e-2 amax, fp8_e5m2 7.143e-2 amax; relative to
# |x| for |x| >= amax / 16: 5.88e-2, 5.88e-2, 1.111e-1). The bounds are half a step of the top binade
# (int8: amax / 254; e4m3: 16 / 448 amax; e5m2: 4096 / 57344 amax) and half an ulp relative (1/17, 1/9).
ABS_BOUND = {"int8": 1 / 254, "fp8_e4m3": 16 / 448, "fp8_e5m2": 4096 / 57344}
REL_BOUND = {"int8": 1 / 17, "fp8_e4m3": 1 / 17, "fp8_e5m2": 1 / 9}


@pytest.mark.parametrize("kv_dtype", KV8)
def test_round_trip_error_bounds(kv_dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, 64, generator=g) * torch.logspace(-4, 4, 512)[:, None, None]
    x[0] = 0.0  # an all-zero row
    x[1, :, 7] = 1e3  # an outlier
    q, s = quantize_kv(x, kv_dtype)
    assert q.dtype == KV_QUANT[kv_dtype][0] and s.dtype == torch.float32 and s.shape == x.shape[:2]
    y = dequantize_kv(q, s, torch.float32)
    err = (y - x).abs()
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.equal(y[0], torch.zeros_like(y[0]))
    assert bool((err <= amax * ABS_BOUND[kv_dtype] * (1 + 1e-5)).all())
    big = x.abs() >= amax / 16
    assert bool((err[big] <= x.abs()[big] * REL_BOUND[kv_dtype] * (1 + 1e-5)).all())
    # the largest value of each row is representable: it lands on the top code
    top = q.float().abs().amax(-1)
    assert bool((top[1:] == KV_QUANT[kv_dtype][1]).all())


def test_bad_kv_dtype_values_name_the_field():
    for bad in ("int4", "fp16", "", None, 8):
        with pytest.raises(ValueError, match="kv_dtype"):
            CacheConfig(kv_dtype=bad)
    with pytest.raises(ValueError, match="kv_dtype"):
        TurboConfig().replace(kv_dtype="float8")
    k = torch.zeros(2, 4, 2, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="k_scale"):  # an 8-bit cache without its scales
        store_kv(torch.randn(1, 2, 16), torch.randn(1, 2, 16), k, k.clone(), torch.tensor([0]), backend="reference")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_blocks_per_byte_budget(head_dim):
    budget = 8 << 20
    blocks = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model("llama", dtype=dtype, head_dim=head_dim)
        layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
        for kv in ("auto", "int8", "fp8_e4m3"):
            cfg = TurboConfig().replace(cpu_kv_bytes=budget, kv_dtype=kv, block_size=16)
            got = num_kv_blocks(model, cfg)
            value_bytes = 1 if kv != "auto" else torch.empty((), dtype=dtype).element_size()
            per_token_head = head_dim * value_bytes + (4 if kv != "auto" else 0)  # + a float32 scale
            assert got == budget // (2 * layers * 16 * kv_heads * per_token_head)
            assert kv_bytes_per_token_head(kv, head_dim, dtype) == per_token_head
            blocks[dtype, kv] = got
    assert blocks[torch.float32, "int8"] / blocks[torch.float32, "auto"] >= 4 * head_dim / (head_dim + 4) - 0.01
    assert blocks[torch.bfloat16, "int8"] / blocks[torch.bfloat16, "auto"] >= 2 * head_dim / (head_dim + 4) - 0.01
    assert blocks[torch.float32, "int8"] / blocks[torch.float32, "auto"] > 3.7
    assert blocks[torch.bfloat16, "int8"] / blocks[torch.bfloat16, "auto"] > 1.85


def test_fp8_on_the_triton_kernels_needs_compute_capability_8_9(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"kv_dtype 'fp8_e4m3'.*8\.9.*8\.0"):
        resolve_backend("triton", "cuda", "fp8_e4m3")
    assert resolve_backend("triton", "cuda", "int8") == "triton"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_backend("triton", "cuda", "fp8_e5m2") == "triton"


def test_the_cpu_backend_gives_way_to_the_reference_for_an_8bit_cache(caplog):
    with caplog.at_level(logging.INFO, logger="hf_turbo.backends"):
        assert resolve_backend("auto", "cpu", "int8") == "reference"
    assert sum("reference backend" in r.getMessage() for r in caplog.records) == 1
    assert resolve_backend("cpu", "cpu", "fp8_e4m3") == "reference"
    assert resolve_backend("reference", "cpu", "int8") == "reference"
    from hf_turbo.backends.cpu import CpuBackend

    with pytest.raises(ValueError, match="8-bit"):
        PagedKVCache(4, 4, 1, torch.float32, "cpu", kv_shape=(2, 16), backend=CpuBackend(), kv_dtype="int8")


@pytest.mark.parametrize("kv_dtype", KV8)
def test_cache_edges_dequantize_on_read_and_quantize_on_write(kv_dtype):
    cache = PagedKVCache(6, 4, 2, torch.float32, "cpu", kv_shape=(2, 16), kv_dtype=kv_dtype)
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(7, 2, 16, generator=g), torch.randn(7, 2, 16, generator=g)
    cache.write_tokens(1, [5, 2], k, v)  # an imported cache
    rk, rv = cache.read_tokens(1, [5, 2], 7)  # an exported one
    for got, src in ((rk, k), (rv, v)):
        q, s = quantize_kv(src, kv_dtype)
        assert got.dtype == torch.float32 and torch.equal(got, dequantize_kv(q, s, torch.float32))
    cache.copy_block(2, 0)  # copy-on-write carries the scales
    assert torch.equal(cache.read_tokens(1, [5, 0], 7)[0], rk)


# -- accuracy against the float32 cache ---------------------------------------------------------
# Teacher-forced per-token log-likelihood |int8 - float32 cache| (8 random prompts of 20..59 tokens, block size 16;
# the test runs the first 4 of them) measured: fixture mean 1.2e-2 max 6.3e-2; llama 1.1e-2 / 5.3e-2; qwen3 8.7e-3 /
# 3.9e-2; mistral 9.8e-3 / 5.8e-2; gemma2 2.6e-3 / 1.2e-2; phi3 1.0e-2 / 5.9e-2. Greedy exact match with the float32
# engine over 16 new tokens: 0.88, 0.75, 1.00, 0.62, 0.88, 0.75 of the prompts (the report carries the figures).
TF_MAX, TF_MEAN = 0.15, 0.03


def _prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab - 1, (int(torch.randint(20, 60, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@functools.cache
def _fixture():
    from transformers import AutoModelForCausalLM

    from hf_turbo.testing import fixture_path

    return AutoModelForCausalLM.from_pretrained(fixture_path("target"), dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["fixture", "llama", "qwen3", "mistral", "gemma2", "phi3"])
def test_int8_log_likelihood_within_bound_of_the_float_cache(arch):
    model = _fixture() if arch == "fixture" else tiny_model(arch)
    prompts = _prompts(model.config.vocab_size, 4)
    cfg = TurboConfig().replace(num_blocks=64, block_size=16)
    try:
        base = turbo_logprobs(model, None, prompts, cfg)
        got = turbo_logprobs(model, None, prompts, cfg.replace(kv_dtype="int8"))
    finally:
        hf_turbo.restore(model)
    d = torch.tensor([abs(a - b) for x, y in zip(base, got) for a, b in zip(x, y)])
    assert d.max() <= TF_MAX and d.mean() <= TF_MEAN
    assert d.max() > 0  # the int8 cache really was read


# -- the int8 engine is exact with respect to itself ---------------------------------------------
GREEDY = SamplingParams(max_new_tokens=12, min_new_tokens=12)


def _run(model, prompts, params=GREEDY, **over) -> tuple[list[tuple[int, ...]], dict]:
    engine = Engine(model, config=TurboConfig(debug_checks=True).replace(kv_dtype="int8", **over))
    assert engine.cache.kv_dtype == "int8" and engine.cache.key_pools[0].dtype == torch.int8
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert engine.pool.num_free == engine.pool.num_blocks, "KV blocks leaked"
    return [tuple(o.token_ids) for o in outs], engine.stats()


@pytest.mark.parametrize("arch, variations", [("llama", "prefix chunked preempted ngram"),
                                               ("gemma2", "chunked preempted")])  # gemma2: window + softcap
def test_int8_engine_equals_itself_under_scheduling_variations(arch, variations):
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, model.config.vocab_size - 1, (20,), generator=g).tolist()
    prompts = _prompts(model.config.vocab_size, 6, seed=2)
    prompts += [prefix + p[:5] for p in prompts[:3]]  # share 20 tokens: prefix-cache hits with block size 4
    try:
        plain, _ = _run(model, prompts, enable_prefix_caching=False)
        if "prefix" in variations:
            warm, stats = _run(model, prompts, block_size=4)
            assert warm == plain and stats["prefix_cache_hits"] > 0
        if "chunked" in variations:
            chunked, stats = _run(model, prompts, max_num_batched_tokens=8)
            assert chunked == plain and stats["steps"] > len(prompts) * 3
        if "preempted" in variations:
            preempted, stats = _run(model, prompts, num_blocks=20, block_size=4, max_num_batched_tokens=64)
            assert preempted == plain and stats["preemptions"] > 0
        if "ngram" in variations:
            spec = hf_turbo.SpeculativeConfig("ngram", num_tokens=3, adaptive=False)
            speculated, stats = _run(model, prompts, speculative=spec)
            assert speculated == plain and stats["spec_proposed"] > 0
    finally:
        hf_turbo.restore(model)


def test_prefix_cache_hit_and_miss_on_one_int8_engine():
    model = tiny_model("llama")
    prompts = [list(range(5, 45)) + [50 + i] for i in range(4)]
    try:
        engine = Engine(model, config=TurboConfig(debug_checks=True).replace(kv_dtype="int8", block_size=8))
        cold = [o.token_ids for o in engine.generate(prompts[:1], GREEDY, use_tqdm=False)]
        hits = engine.stats()["prefix_cache_hits"]
        warm = [o.token_ids for o in engine.generate(prompts, GREEDY, use_tqdm=False)]
        assert engine.stats()["prefix_cache_hits"] > hits and warm[0] == cold[0]
        alone = [_run(model, [p], enable_prefix_caching=False)[0][0] for p in prompts[1:]]
        assert [tuple(w) for w in warm[1:]] == alone
    finally:
        hf_turbo.restore(model)


# -- the server flag ------------------------------------------------------------------------------
def test_serve_kv_cache_dtype_int8_serves_a_completion():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from hf_turbo.cli import build_parser
    from hf_turbo.serve.cli import build_app

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-cache-dtype", "int4"])
    app = build_app(build_parser().parse_args(["serve", "--device", "cpu", "--kv-cache-dtype", "int8",
                                               "--num-blocks", "64"]))
    with TestClient(app) as client:
        engine = app.state.hf_turbo.engine.engine
        assert engine.cache.kv_dtype == "int8" and engine.backend.name == "reference"
        ok = client.post("/v1/completions", json={"model": "fixture", "prompt": "def f(x):", "max_tokens": 8})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] >= 1 and math.isfinite(len(ok.json()["choices"][0]["text"]))
