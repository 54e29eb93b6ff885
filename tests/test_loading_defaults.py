"""GPU-fit loading and serving defaults, checked on the CPU: --dtype auto, --gpu-memory-utilization,
--max-model-len, and the KV sizing arithmetic with a fake memory reading."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_turbo.cli import build_parser
from hf_turbo.engine.memory import kv_budget_bytes, profile_forward_peak
from hf_turbo.loading import load_model_and_tokenizer, resolve_dtype
from hf_turbo.testing import fixture_path, tiny_model

GIB = 1 << 30


def _checkpoint(tmp_path, dtype: torch.dtype):
    """A tiny Llama saved in ``dtype`` with the fixture's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fixture_path("target"))
    model = tiny_model("llama", vocab_size=len(tok)).to(dtype)
    model.config.dtype = dtype
    path = tmp_path / str(dtype).removeprefix("torch.")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("saved", [torch.float32, torch.bfloat16])
def test_dtype_auto_picks_per_checkpoint_and_device(tmp_path, saved, caplog):
    from transformers import AutoConfig

    path = _checkpoint(tmp_path, saved)
    config = AutoConfig.from_pretrained(path)
    # CPU: float32 whatever the checkpoint holds (the exactness contract; no fast bf16 here)
    assert resolve_dtype("auto", config, "cpu") == torch.float32
    # CUDA (resolved, nothing allocated): the checkpoint's dtype, bfloat16 for a float32 one, with a log line
    with caplog.at_level(logging.INFO, logger="hf_turbo.loading"):
        assert resolve_dtype("auto", config, "cuda") == torch.bfloat16
    assert ("loads as bfloat16" in caplog.text) == (saved == torch.float32)
    # explicit dtypes win on either device
    assert resolve_dtype("float16", config, "cuda") == torch.float16
    assert resolve_dtype("float32", config, "cuda") == torch.float32
    model, _ = load_model_and_tokenizer(path, device="cpu")
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    model, _ = load_model_and_tokenizer(path, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16


def test_dtype_auto_for_a_float16_checkpoint_on_cuda_keeps_it(tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(_checkpoint(tmp_path, torch.float16))
    assert resolve_dtype("auto", config, "cuda") == torch.float16


def test_serve_flags_parse_with_gpu_fit_defaults():
    args = build_parser().parse_args(["serve"])
    assert (args.dtype, args.gpu_memory_utilization, args.max_model_len) == ("auto", 0.85, None)
    args = build_parser().parse_args(["serve", "--dtype", "bf16", "--gpu-memory-utilization", "0.5",
                                      "--max-model-len", "96"])
    assert (args.dtype, args.gpu_memory_utilization, args.max_model_len) == ("bf16", 0.5, 96)


@pytest.mark.parametrize("flags, word", [
    (["--dtype", "float64"], "--dtype"), (["--dtype", "half-ish"], "--dtype"),
    (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["--gpu-memory-utilization", "nan"], "--gpu-memory-utilization"),
    (["--max-model-len", "0"], "--max-model-len"),
    (["--max-model-len", "100000"], "--max-model-len"),  # past the fixture's positions
])
def test_serve_refuses_bad_gpu_fit_flags(flags, word):
    from hf_turbo.serve.cli import build_app

    with pytest.raises(ValueError, match=word):
        build_app(build_parser().parse_args(["serve", "--device", "cpu", *flags]))


def test_max_model_len_reaches_the_engine_and_the_server():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from hf_turbo.serve.cli import build_app

    app = build_app(build_parser().parse_args(["serve", "--device", "cpu", "--max-model-len", "40",
                                               "--gpu-memory-utilization", "0.6"]))
    with TestClient(app) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["max_model_len"] == 40
        ok = client.post("/v1/completions", json={"model": "fixture", "prompt": "def f(x):", "max_tokens": 8})
        assert ok.status_code == 200, ok.text
        too_long = client.post("/v1/completions",
                               json={"model": "fixture", "prompt": "def f(x):", "max_tokens": 39})
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"


def test_kv_budget_arithmetic_with_a_fake_reading():
    # 80 GiB card, 17 GiB in use after the weights, a 3 GiB forward peak, 90%: 72 - 17 - 3 = 52 GiB
    assert kv_budget_bytes(80 * GIB, 63 * GIB, 3 * GIB, 0.9) == 52 * GIB
    # other processes' memory counts as in use too
    assert kv_budget_bytes(80 * GIB, 40 * GIB, 0, 1.0) == 40 * GIB
    with pytest.raises(ValueError, match="no room for the KV cache"):
        kv_budget_bytes(16 * GIB, 4 * GIB, 2 * GIB, 0.85)
    for bad in (0.0, 1.01, float("nan")):
        with pytest.raises(ValueError, match="gpu_memory_fraction"):
            kv_budget_bytes(80 * GIB, 63 * GIB, 0, bad)
    with pytest.raises(ValueError, match="inconsistent"):
        kv_budget_bytes(80 * GIB, 90 * GIB, 0, 0.9)


def test_kv_sizing_uses_the_profiled_budget_on_cuda(monkeypatch):
    """num_kv_blocks' CUDA branch divides the profiled budget, with the fake reading standing in for CUDA."""
    from hf_turbo.cache.paged_cache import PagedKVCache
    from hf_turbo.config import CacheConfig, TurboConfig
    from hf_turbo.engine import memory as engine_mod

    model = tiny_model("llama")
    seen = {}

    def fake_budget(m, fraction, tokens):
        seen.update(fraction=fraction, tokens=tokens)
        return kv_budget_bytes(8 * GIB, 7 * GIB, 0, fraction)

    monkeypatch.setattr(engine_mod, "cuda_kv_budget", fake_budget)
    monkeypatch.setattr(engine_mod, "model_max_len", lambda m: None)

    class _OnCuda:  # the parameters' device is all num_kv_blocks reads to pick the branch
        config = model.config

        def parameters(self):
            p = next(model.parameters())
            yield type("P", (), {"dtype": p.dtype, "device": torch.device("cuda", 0)})()

    config = TurboConfig(cache=CacheConfig(gpu_memory_fraction=0.5), max_num_batched_tokens=512)
    per_block = PagedKVCache.bytes_per_block(model.config, 16, torch.float32)
    assert engine_mod.num_kv_blocks(_OnCuda(), config) == (3 * GIB) // per_block
    assert seen == {"fraction": 0.5, "tokens": 512}


def test_profiling_forward_is_cuda_only():
    with pytest.raises(ValueError, match="CUDA only"):
        profile_forward_peak(tiny_model("llama"), 8)


@pytest.mark.gpu
def test_cuda_auto_load_and_profiled_kv_pool(tmp_path):
    """On a GPU: a float32 checkpoint loads as bfloat16 straight onto the card, the KV pool is sized
    after a profiling forward within the memory share, and greedy generation runs."""
    import hf_turbo
    from hf_turbo import Engine, SamplingParams
    from hf_turbo.engine.memory import cuda_kv_budget

    model, tok = load_model_and_tokenizer(_checkpoint(tmp_path, torch.float32))
    assert model.dtype == torch.bfloat16 and all(p.device.type == "cuda" for p in model.parameters())
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    _, total = torch.cuda.mem_get_info()
    assert profile_forward_peak(model, 256) > 0
    assert 0 < cuda_kv_budget(model, 0.5, 256) < 0.5 * total
    try:
        engine = Engine(model, tok, max_num_batched_tokens=256)
        out = engine.generate(["def f(x):"], SamplingParams(max_new_tokens=8), use_tqdm=False)[0]
        assert len(out.token_ids) == 8
    finally:
        hf_turbo.restore(model)
