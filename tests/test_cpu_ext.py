"""The CPU backend's C++ ops (backends/cpu/ext.py, csrc/): the batched decode attention bitwise the per-sequence
SDPA calls and used by the engine, the other ops bitwise what they replace, and a clean fallback when they
cannot be used."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import hf_turbo
from hf_turbo import Engine, SamplingParams
from hf_turbo.backends.cpu import ext as cpu_ops
from hf_turbo.backends.torch_kernels import sequence_attention_ref
from hf_turbo.testing import tiny_model


@pytest.fixture(scope="module")
def ext():
    """The built extension module (its raw ops), where it built and its decode attention passed its check."""
    if cpu_ops.decode_attention() is None:
        pytest.skip("the CPU decode attention did not build or failed its self-check here (see the log)")
    return cpu_ops.load()


@pytest.fixture
def fresh(monkeypatch):
    """Each op decided again inside the test (and again after it, with the real build)."""
    cpu_ops.clear()
    yield monkeypatch
    monkeypatch.undo()
    cpu_ops.clear()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("h_kv,g,d", [(2, 2, 64), (1, 1, 16), (4, 2, 32), (2, 6, 40), (1, 32, 8), (1, 40, 8)])
def test_bitwise_equal_to_per_sequence_sdpa(ext, h_kv, g, d, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_against_sdpa(ext, h_kv, g, d)
    finally:
        torch.set_num_threads(before)


def _check_against_sdpa(ext, h_kv, g, d):
    gen = torch.Generator().manual_seed(h_kv * 100 + g * 10 + d)
    lens = [1, 2, 15, 16, 17, 63, 200, 511, 512, 513, 1023, 1024, 1025, 1300]
    n, cap = len(lens), 1300
    # arenas as the mirror has them: views with a storage offset, a capacity beyond every length
    k_store = torch.randn(n + 3, h_kv, cap + 5, d, generator=gen) * 3
    v_store = torch.randn(n + 3, h_kv, cap + 5, d, generator=gen)
    k, v = k_store[1:, :, :cap], v_store[1:, :, :cap]
    q = torch.randn(n + 4, h_kv, g, d, generator=gen)
    perm = torch.randperm(n, generator=gen)
    rows = perm + 2  # any order, any rows
    slots = torch.randperm(n + 2, generator=gen)[:n]
    out = torch.full_like(q, 7.0)
    scale = 0.7 / d ** 0.5
    ext.decode_attention(q, k, v, rows, slots, torch.tensor([lens[i] for i in perm.tolist()]), scale, out)
    for i in range(n):
        r, s, length = int(rows[i]), int(slots[i]), lens[int(perm[i])]
        ref = F.scaled_dot_product_attention(q[r:r + 1], k[s:s + 1, :, :length], v[s:s + 1, :, :length], scale=scale)
        assert torch.equal(out[r], ref[0]), (r, length)
    assert bool((out[:2] == 7.0).all()) and bool((out[n + 2:] == 7.0).all())  # rows not asked for: untouched


def test_mixed_step_equals_reference(ext):
    """Decode rows through the extension plus prefill chunks through the reference = the reference alone."""
    gen = torch.Generator().manual_seed(5)
    h_q, h_kv, d, cap = 4, 2, 16, 64
    q_lens, ctx = [1, 5, 1, 3, 1], [40, 12, 9, 64, 1]
    starts = [0]
    for ql in q_lens:
        starts.append(starts[-1] + ql)
    q = torch.randn(starts[-1], h_q, d, generator=gen)
    k = torch.randn(6, h_kv, cap, d, generator=gen)
    v = torch.randn(6, h_kv, cap, d, generator=gen)
    slots = [3, 0, 5, 1, 2]
    want = sequence_attention_ref(q, starts, ctx, k, v, slots=slots, scale=0.25)
    out = torch.full_like(q, float("nan"))
    dec = [s for s, ql in enumerate(q_lens) if ql == 1]
    ext.decode_attention(q.view(-1, h_kv, 2, d), k, v, torch.tensor([starts[s] for s in dec]),
                         torch.tensor([slots[s] for s in dec]), torch.tensor([ctx[s] for s in dec]), 0.25,
                         out.view(-1, h_kv, 2, d))
    sequence_attention_ref(q, starts, ctx, k, v, slots=slots, scale=0.25, out=out, skip_decode=True)
    assert torch.equal(out, want)


def test_rejects_out_of_range_metadata(ext):
    q = torch.randn(2, 1, 1, 8)
    k = torch.randn(3, 1, 10, 8)
    out = torch.empty_like(q)
    one = torch.tensor([0])
    for rows, slots, lens in [(one, torch.tensor([3]), torch.tensor([5])), (torch.tensor([2]), one, torch.tensor([5])),
                              (one, one, torch.tensor([11])), (one, one, torch.tensor([0]))]:
        with pytest.raises(RuntimeError, match="out of range"):
            ext.decode_attention(q, k, k, rows, slots, lens, 1.0, out)
    with pytest.raises(RuntimeError, match="float32"):
        ext.decode_attention(q.double(), k, k, one, one, one, 1.0, out)
    with pytest.raises(RuntimeError, match="share the layout"):
        ext.decode_attention(q, k, k[:, :, :5], one, one, one, 1.0, out)


@pytest.mark.cpu_backend
def test_engine_uses_it_and_matches_stock(ext, monkeypatch):
    model = tiny_model("llama", seed=3)
    calls = []
    real = ext.decode_attention
    counting = lambda *a: calls.append(a[3].numel()) or real(*a)  # noqa: E731
    monkeypatch.setattr(cpu_ops, "decode_attention", lambda: counting)  # what the CPU backend takes at build
    prompts = [[(7 * i + j) % 200 + 1 for j in range(5 + 9 * i)] for i in range(5)]
    want = [model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist()
            for p in prompts]
    engine = Engine(model)
    got = [o.token_ids for o in engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0),
                                                use_tqdm=False)]
    assert got == want
    assert calls and max(calls) == len(prompts)  # decode steps went through the extension, all at once


def test_failed_self_check_falls_back(fresh, caplog):
    real = cpu_ops.load()
    if real is None:
        pytest.skip("the extension did not build here")
    fresh.setattr(cpu_ops, "_self_check", lambda module: "L=17: max abs difference 1e-07")
    with caplog.at_level(logging.WARNING, logger="hf_turbo.backends.cpu.ext"):
        assert cpu_ops.decode_attention() is None
        assert cpu_ops.decode_attention() is None  # decided once
        assert cpu_ops.scatter_kv() is not None  # each op stands on its own check
    assert sum("differs from scaled_dot_product_attention" in r.message for r in caplog.records) == 1
    model = tiny_model("qwen2", seed=1)
    prompt = [5, 9, 2, 33, 7, 1]
    want = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    hf_turbo.accelerate(model)
    try:
        got = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    finally:
        hf_turbo.restore(model)
    assert got == want


@pytest.mark.cpu_backend
def test_failed_build_falls_back(fresh, caplog):
    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions")

    fresh.setattr(cpu_ops, "_build", no_compiler)
    with caplog.at_level(logging.WARNING, logger="hf_turbo.backends.cpu.ext"):
        ops = [cpu_ops.decode_attention(), cpu_ops.scatter_kv(), cpu_ops.rope(), cpu_ops.rms_norm(),
               cpu_ops.silu_mul(), cpu_ops.packed_gemm()]
    assert ops == [None] * 6
    assert sum("Ninja is required" in r.message for r in caplog.records) == 1  # one build attempt, one warning
    model = tiny_model("llama", seed=2)
    prompt = [5, 9, 2, 33, 7, 1]
    want = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    engine = Engine(model)
    assert engine.backend.name == "cpu"  # the rows without the C++ ops
    got = engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0), use_tqdm=False)[0].token_ids
    hf_turbo.restore(model)
    assert got == want


# -- the K/V writes and the rotary embedding -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_kv_into_pool_and_rows(ext, dtype):
    """scatter_kv writes what index_copy_ writes, into a pool seen through a permute and into [S, H, C, D] rows."""
    gen = torch.Generator().manual_seed(7)
    n, h, d, bs, blocks = 11, 3, 8, 4, 6
    # k as the attention has it: [T, H, D] over [H, T, D] memory (strided), v contiguous
    k = torch.randn(h, n, d, generator=gen).to(dtype).transpose(0, 1)
    v = torch.randn(n, h, d, generator=gen).to(dtype)
    slots = torch.randperm(blocks * bs, generator=gen)[:n]
    pool_k = torch.full((blocks, bs, h, d), 5.0, dtype=dtype)
    pool_v = pool_k.clone()
    ext.scatter_kv(k, v, pool_k.permute(0, 2, 1, 3), pool_v.permute(0, 2, 1, 3), slots, bs)
    ref_k = torch.full((blocks * bs, h, d), 5.0, dtype=dtype).index_copy_(0, slots, k)
    ref_v = torch.full((blocks * bs, h, d), 5.0, dtype=dtype).index_copy_(0, slots, v)
    assert torch.equal(pool_k.view(-1, h, d), ref_k) and torch.equal(pool_v.view(-1, h, d), ref_v)

    rows_k = torch.zeros(4, h, 10, d, dtype=dtype)
    rows_v = torch.zeros(4, h, 10, d, dtype=dtype)
    pos = torch.randperm(10, generator=gen)[: n % 10 + 1]  # distinct positions, so no write hides another
    slot = torch.randint(0, 4, (len(pos),), generator=gen)
    ext.scatter_kv(k[: len(pos)], v[: len(pos)], rows_k, rows_v, slot * 10 + pos, 10)
    for i in range(len(pos)):
        assert torch.equal(rows_k[slot[i], :, pos[i]], k[i]) and torch.equal(rows_v[slot[i], :, pos[i]], v[i])
    assert int((rows_k != 0).any(-1).sum()) == len(pos) * h  # nothing else written


def test_scatter_kv_rejects_bad_input(ext):
    k = torch.randn(3, 2, 8)
    pool = torch.zeros(2, 2, 4, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        ext.scatter_kv(k, k, pool, pool.clone(), torch.tensor([0, 1, 8]), 4)
    with pytest.raises(RuntimeError, match="one dtype"):
        ext.scatter_kv(k.double(), k.double(), pool, pool.clone(), torch.tensor([0, 1, 2]), 4)
    with pytest.raises(RuntimeError, match="one entry per token"):
        ext.scatter_kv(k, k, pool, pool.clone(), torch.tensor([0, 1]), 4)
    with pytest.raises(RuntimeError, match="block"):
        ext.scatter_kv(k, k, pool, pool.clone(), torch.tensor([0, 1, 2]), 3)


@pytest.mark.parametrize("t,d", [(1, 64), (7, 64), (33, 128), (5, 16), (3, 6)])
def test_rope_bitwise_equal_to_transformers(ext, t, d):
    """The one-call rotary embedding equals transformers' apply_rotary_pos_emb bit for bit (no FMA contraction)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    if cpu_ops.rope() is None:
        pytest.skip("the extension's rope failed its check here (see the log)")
    gen = torch.Generator().manual_seed(t * 1000 + d)
    q = torch.randn(1, t, 4, d, generator=gen).transpose(1, 2) * 50  # the layout the projections give
    k = torch.randn(1, t, 2, d, generator=gen).transpose(1, 2) * 50
    angles = torch.rand(1, t, d // 2, generator=gen) * 2000
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = ext.rope(q, k, cos, sin)
    assert got_q.shape == ref_q.shape and got_k.shape == ref_k.shape
    assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)


def test_rope_rejects_bad_input(ext):
    q = torch.randn(1, 4, 3, 8)
    cos = torch.randn(1, 3, 8)
    with pytest.raises(RuntimeError, match="float32"):
        ext.rope(q.double(), q.double(), cos.double(), cos.double())
    with pytest.raises(RuntimeError, match="cos and sin"):
        ext.rope(q, q, cos[:, :2], cos[:, :2])
    with pytest.raises(RuntimeError, match="even"):
        ext.rope(q[..., :7], q[..., :7], cos[..., :7], cos[..., :7])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 1, 256), (1, 16, 256), (1, 2048, 256), (1, 3, 7), (1, 9, 8), (1, 5, 33),
                                   (1, 64, 704), (1, 17, 1000), (1, 2, 5120), (1, 12, 4, 64), (1, 3, 2, 128),
                                   (1, 1, 40000)])
def test_rms_norm_bitwise_equal_to_transformers(ext, shape, threads):
    """One call, the same bits as LlamaRMSNorm's 7 ops: ATen's cascade sum order, no FMA contraction."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    if cpu_ops.rms_norm() is None:
        pytest.skip("the extension's RMSNorm failed its check here (see the log)")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(sum(shape) * 10 + threads)
        for eps in (1e-6, 1e-5):
            norm = LlamaRMSNorm(shape[-1], eps=eps)
            with torch.no_grad():
                norm.weight.copy_(torch.randn(shape[-1], generator=gen) * 0.5 + 1)
            for scale in (1e-3, 1.0, 1e3):
                x = torch.randn(shape, generator=gen) * scale * torch.exp(torch.randn(shape, generator=gen))
                with torch.no_grad():
                    ref = norm(x)
                got = ext.rms_norm(x, norm.weight, eps)
                assert got.shape == ref.shape and got.is_contiguous()
                assert torch.equal(got, ref), (eps, scale)
    finally:
        torch.set_num_threads(before)


def test_rms_norm_strided_input_is_still_exact(ext):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    if cpu_ops.rms_norm() is None:
        pytest.skip("the extension's RMSNorm failed its check here (see the log)")
    norm = LlamaRMSNorm(64)
    with torch.no_grad():
        norm.weight.normal_()
    base = torch.randn(1, 64, 10, 64)
    for x in (base[:, :, 3], base.transpose(1, 3)[:, :, 2], base[..., ::2, :]):  # rows strided; last dim strided
        with torch.no_grad():
            assert torch.equal(ext.rms_norm(x, norm.weight, 1e-6), norm(x))


def test_rms_norm_rejects_bad_input(ext):
    x = torch.randn(1, 3, 8)
    with pytest.raises(RuntimeError, match="float32"):
        ext.rms_norm(x.double(), torch.ones(8, dtype=torch.double), 1e-6)
    with pytest.raises(RuntimeError, match=r"weight must be \[H\]"):
        ext.rms_norm(x, torch.ones(7), 1e-6)


def test_silu_mul_bitwise_equal_to_torch(ext):
    """F.silu(gate) * up in one pass: the vector/scalar split of torch's loop, so every tail length matches."""
    if cpu_ops.silu_mul() is None:
        pytest.skip("the extension's silu_mul failed its check here (see the log)")
    gen = torch.Generator().manual_seed(99)
    for n in [*range(1, 100), 704, 11264, 16 * 1408, 32767]:
        for scale in (0.1, 4.0, 30.0):
            gate = torch.randn(1, n, generator=gen) * scale
            up = torch.randn(1, n, generator=gen)
            assert torch.equal(ext.silu_mul(gate, up), F.silu(gate) * up), (n, scale)
    gate = torch.tensor([[0.0, -0.0, 88.0, -88.0, 104.0, -104.0, 1e-30, float("inf"), float("-inf")]])
    # bit for bit, NaN where torch gives NaN (silu(-inf))
    assert torch.allclose(ext.silu_mul(gate, torch.ones_like(gate)), F.silu(gate), rtol=0, atol=0, equal_nan=True)


def test_silu_mul_rejects_bad_input(ext):
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="float32"):
        ext.silu_mul(x.double(), x.double())
    with pytest.raises(RuntimeError, match="one shape"):
        ext.silu_mul(x, x[:, :4])
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.silu_mul(x.t(), x.t())
