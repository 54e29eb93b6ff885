"""Packed linear weights (backends/cpu/packed.py): bitwise F.linear for every token count, used only where checked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hf_turbo
from hf_turbo import Engine, SamplingParams
from hf_turbo.backends.cpu import ext as cpu_ops
from hf_turbo.backends.cpu import packed
from hf_turbo.backends.cpu.packed import PackedLinear
from hf_turbo.loading import load_model_and_tokenizer


@pytest.fixture(scope="module")
def ext():
    if cpu_ops.packed_gemm() is None:
        pytest.skip("the CPU extension or MKL's packed GEMM is not available here")
    return cpu_ops.load()


def _linear(n_in: int, n_out: int, bias: bool, seed: int = 0) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(n_in, n_out, bias=bias)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n_in,n_out,bias", [(256, 704, False), (704, 256, False), (64, 96, True), (128, 512, True)])
def test_equals_f_linear_for_every_token_count(ext, n_in, n_out, bias, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lin = _linear(n_in, n_out, bias)
        wrapped = PackedLinear(lin)
        gen = torch.Generator().manual_seed(7)
        with torch.inference_mode():
            for t in [*range(1, 41), 64, 100, 255, 256, 257, 600]:
                x = torch.randn(1, t, n_in, generator=gen) * 3
                assert torch.equal(wrapped(x), F.linear(x, lin.weight, lin.bias)), t
        # the packed weight served the counts where MKL's packed product matched (on this machine: most)
        assert 0 < wrapped.hits <= 44
    finally:
        torch.set_num_threads(before)


def test_packed_linear_leaves_the_bias_alone(ext):
    # a one-token call once multiplied into the bias itself (contiguous() of its [1, N] expand aliases it)
    w, b = torch.randn(96, 64), torch.randn(96)
    kept = b.clone()
    p = ext.pack_weight(w)
    for t in (1, 1, 5):
        x = torch.randn(t, 64)
        out = ext.packed_linear(x, p, 96, 64, b)
        assert torch.equal(b, kept)
        assert torch.allclose(out, F.linear(x, w, b), atol=1e-5)


def test_weight_changed_in_place_or_replaced_is_repacked(ext):
    lin = _linear(256, 256, bias=True)
    wrapped = PackedLinear(lin)
    x = torch.randn(1, 16, 256)
    with torch.inference_mode():
        assert torch.equal(wrapped(x), F.linear(x, lin.weight, lin.bias))
    with torch.no_grad():
        lin.weight.mul_(-2)
        lin.bias.add_(1)
    with torch.inference_mode():
        assert torch.equal(wrapped(x), F.linear(x, lin.weight, lin.bias))
    lin.weight = nn.Parameter(torch.randn(256, 256))
    with torch.inference_mode():
        assert torch.equal(wrapped(x), F.linear(x, lin.weight, lin.bias))
    lin.weight.data = torch.randn(256, 256)  # new data under the same Parameter (no version bump)
    with torch.inference_mode():
        assert torch.equal(wrapped(x), F.linear(x, lin.weight, lin.bias))
    assert wrapped.hits == 4 and wrapped._weight is lin.weight


def test_a_mismatch_is_never_used(ext, monkeypatch):
    lin = _linear(256, 704, bias=False, seed=3)
    monkeypatch.setattr(packed, "_verdicts", {})
    pack_weight, _ = cpu_ops.packed_gemm()
    off = lambda x, p, n, k, b: F.linear(x, lin.weight, b) + 1e-3  # noqa: E731
    monkeypatch.setattr(cpu_ops, "packed_gemm", lambda: (pack_weight, off))
    wrapped = PackedLinear(lin)
    x = torch.randn(1, 16, 256)
    with torch.inference_mode():
        assert torch.equal(wrapped(x), F.linear(x, lin.weight))
    assert wrapped.hits == 0 and packed._verdicts and not any(packed._verdicts.values())


def test_not_packed_off_cpu_float32_or_when_off(ext):
    lin = _linear(64, 64, bias=True).to(torch.bfloat16)
    x = torch.randn(1, 16, 64, dtype=torch.bfloat16)
    for wrapped in (PackedLinear(lin), PackedLinear(_linear(64, 64, bias=True), pack=False)):
        assert wrapped.packed is None
        with torch.inference_mode():
            assert torch.equal(wrapped(x.to(wrapped.linear.weight.dtype)),
                               F.linear(x.to(wrapped.linear.weight.dtype), wrapped.linear.weight, wrapped.linear.bias))
        assert wrapped.hits == 0


def test_pack_and_packed_linear_reject_bad_input(ext):
    w = torch.randn(32, 16)
    with pytest.raises(RuntimeError, match="pack_weight"):
        ext.pack_weight(w.t())  # not contiguous
    with pytest.raises(RuntimeError, match="pack_weight"):
        ext.pack_weight(w.double())
    p = ext.pack_weight(w)
    with pytest.raises(RuntimeError, match="last dim is 16"):
        ext.packed_linear(torch.randn(3, 8), p, 32, 16, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.packed_linear(torch.randn(16, 3).t(), p, 32, 16, None)
    with pytest.raises(RuntimeError, match="not a packed"):
        ext.packed_linear(torch.randn(3, 16), p[:100], 32, 16, None)
    with pytest.raises(RuntimeError, match="bias"):
        ext.packed_linear(torch.randn(3, 16), p, 32, 16, torch.randn(31))


def _fixture_engine_vs_stock(budget_ok: bool, monkeypatch) -> Engine:
    model, tok = load_model_and_tokenizer("fixture")
    if not budget_ok:
        monkeypatch.setattr(packed, "PACK_BUDGET_BYTES", 0)
    prompts = [tok(f"def function_{i}(x):\n    return x * {i} + ").input_ids for i in range(16)]
    stock = []
    for p in prompts:
        seq = model.generate(input_ids=torch.tensor([p]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        stock.append(seq[0, len(p):].tolist())
    engine = Engine(model, tok, config=hf_turbo.TurboConfig(debug_checks=True))
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=24, min_new_tokens=24),  # EOS blocked as stock does
                           use_tqdm=False)
    assert [o.token_ids for o in outs] == stock
    assert engine.runner.lean_verified
    return engine


@pytest.mark.cpu_backend
def test_engine_decodes_on_packed_weights_and_equals_stock(ext, monkeypatch):
    engine = _fixture_engine_vs_stock(True, monkeypatch)
    wrappers = list(engine.backend.linears.values())
    assert len(wrappers) == 4 * 7 + 1  # every projection of the 4 layers, and the head
    assert all(w.hits > 0 for w in wrappers)  # all ran 16-token decode steps packed


@pytest.mark.cpu_backend
def test_over_budget_model_keeps_f_linear(ext, monkeypatch):
    engine = _fixture_engine_vs_stock(False, monkeypatch)
    wrappers = list(engine.backend.linears.values())
    assert len(wrappers) == 4 * 7 + 1 and all(w.packed is None and w.hits == 0 for w in wrappers)
