"""The sampler: transformers' kept sets, softmax distributions, keyed noise, penalties, hooks, safety.

Kept sets are compared with transformers' own warpers; distributions with transformers' processors'
softmax (what ``multinomial`` draws from) through a chi-square test over many keyed draws.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hf_turbo.sampling import RowState, SamplingParams, keyed_uniform, row_keys, sample
from hf_turbo.sampling.filters import candidate_filter, reference_filter
from hf_turbo.sampling.noise import _gumbel_from_bits, keyed_bits, perturbed_argmax
from hf_turbo.sampling.processors import scale_by_temperature

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _stock_filter(x: torch.Tensor, top_k, top_p, min_p) -> torch.Tensor:
    """Transformers' warpers, one row at a time (each row its own parameters)."""
    out = []
    for i in range(x.shape[0]):
        row = x[i:i + 1]
        if top_k[i] > 0:
            row = TopKLogitsWarper(top_k[i])(None, row)
        if top_p[i] < 1.0:
            row = TopPLogitsWarper(top_p[i])(None, row)
        if min_p[i] > 0.0:
            row = MinPLogitsWarper(min_p[i])(None, row)
        out.append(row)
    return torch.cat(out)


def _random_batch(g: torch.Generator, n: int, vocab: int, scale: float, ties: bool, neg_inf: bool):
    x = torch.randn(n, vocab, generator=g) * scale
    if ties:
        x = (x * 2).round() / 2
    if neg_inf:
        x[torch.rand(n, vocab, generator=g) < 0.3] = -math.inf
    rand = lambda: float(torch.rand(1, generator=g))  # noqa: E731
    top_k = [int(torch.randint(1, min(vocab, 80) + 1, (1,), generator=g)) if rand() < 0.5 else 0 for _ in range(n)]
    top_k = [vocab + 3 if k and rand() < 0.1 else k for k in top_k]  # more than the vocabulary
    top_p = [rand() * 0.999 + 0.001 if rand() < 0.6 else 1.0 for _ in range(n)]
    min_p = [rand() * 0.5 if rand() < 0.3 else 0.0 for _ in range(n)]
    keep = [i for i in range(n) if top_k[i] or top_p[i] < 1.0 or min_p[i]]
    return x[keep], [top_k[i] for i in keep], [top_p[i] for i in keep], [min_p[i] for i in keep]


@pytest.mark.parametrize("device", DEVICES)
def test_kept_sets_equal_transformers_on_thousands_of_rows(device):
    """Random rows (ties, -inf, rows with different top-k/top-p/min-p in one batch): the candidate path and
    the reference keep exactly transformers' tokens; few candidates force retries and fallbacks."""
    g = torch.Generator().manual_seed(0)
    rows = proven = 0
    for trial in range(44):
        vocab = int(torch.randint(2, 600, (1,), generator=g))
        x, top_k, top_p, min_p = _random_batch(g, 64, vocab, float(torch.rand(1, generator=g)) * 8,
                                               ties=trial % 3 == 0, neg_inf=trial % 4 == 0)
        want = _stock_filter(x, top_k, top_p, min_p) > -math.inf
        x = x.to(device)
        assert torch.equal(reference_filter(x, top_k, top_p, min_p).cpu() > -math.inf, want), trial
        cands, ref_rows, ref = candidate_filter(x, top_k, top_p, min_p, num_candidates=16, growth=4)
        got = torch.zeros_like(want)
        if cands.rows:
            got[cands.rows] = cands.dense(vocab).cpu() > -math.inf
        if ref_rows:
            got[ref_rows] = ref.cpu() > -math.inf
        assert torch.equal(got, want), trial
        rows += len(top_k)
        proven += len(cands.rows)
    assert rows > 2000 and 0 < proven < rows  # both paths ran


@pytest.mark.parametrize("device", DEVICES)
def test_kept_sets_at_a_real_vocabulary(device):
    """151,936 tokens with a trained model's spread: top-p alone goes through the tail-mass bound."""
    g = torch.Generator().manual_seed(1)
    n, vocab = 12, 151_936
    x = torch.randn(n, vocab, generator=g) * 4.5 / 0.8
    top_k = [0] * 8 + [50, 0, 200, 0]
    top_p = [0.95, 0.9, 0.99, 0.5, 0.95, 0.8, 0.95, 0.999, 0.95, 1.0, 0.9, 1.0]
    min_p = [0.0] * 9 + [0.05, 0.0, 0.1]
    want = _stock_filter(x, top_k, top_p, min_p) > -math.inf
    cands, ref_rows, ref = candidate_filter(x.to(device), top_k, top_p, min_p)
    got = torch.zeros_like(want)
    got[cands.rows] = cands.dense(vocab).cpu() > -math.inf
    if ref_rows:
        got[ref_rows] = ref.cpu() > -math.inf
    assert torch.equal(got, want)
    assert len(cands.rows) >= n - 2  # the bound decides nearly every row without a sort


def test_token_does_not_depend_on_the_path_that_proved_the_kept_set():
    """Candidates, more candidates, or the full reference: the same kept set, so the same keyed token."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(48, 3000, generator=g) * 4
    kinds = [dict(temperature=0.8, top_p=0.95), dict(temperature=1.2, top_k=30), dict(temperature=0.7, min_p=0.1),
             dict(temperature=1.0), dict(temperature=0.9, top_k=100, top_p=0.9, min_p=0.02)]
    rows = [RowState(SamplingParams(**kinds[i % len(kinds)]), position=i, seed=100 + i) for i in range(48)]
    a = sample(logits, rows)
    b = sample(logits, rows, num_candidates=4)
    c = sample(logits, rows, num_candidates=3000)
    temp = torch.tensor([[r.params.temperature] for r in rows])
    x = reference_filter(scale_by_temperature(logits, temp), [r.params.top_k for r in rows],
                         [r.params.top_p for r in rows], [r.params.min_p for r in rows])
    d = perturbed_argmax(x, row_keys([r.seed for r in rows], [r.position for r in rows], "cpu"))
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    # and one row alone draws what it drew in the batch
    assert all(int(sample(logits[i:i + 1], rows[i:i + 1])[0]) == int(a[i]) for i in (0, 7, 31))


def test_keyed_bits_are_the_documented_hash():
    """A pure function of (seed, position, token): the int32 tensor ops equal the formula in Python."""
    mask = (1 << 32) - 1

    def ref(k0: int, k1: int, t: int) -> int:
        x = (t * 0x9E3779B9 + k0) & mask
        x ^= x >> 16
        x = (x * 0x21F0AAAD) & mask
        x ^= x >> 15
        x ^= k1
        x = (x * 0x735A2D97) & mask
        return x ^ (x >> 15)

    keys = row_keys([0, 1, 2 ** 62 + 5], [0, 9, 123456], "cpu")
    tokens = torch.tensor([0, 1, 2, 4097, 151_935, 262_143])
    bits = keyed_bits(keys, tokens)
    for r in range(3):
        k0, k1 = int(keys[r, 0]) & mask, int(keys[r, 1]) & mask
        assert [b & mask for b in bits[r].tolist()] == [ref(k0, k1, int(t)) for t in tokens]
    u = keyed_uniform(keys, torch.arange(100_000))
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.std()) - math.sqrt(1 / 12)) < 0.005
    assert not torch.equal(u[0], u[1])  # another position, other noise
    # the extreme bit patterns stay inside (0, 1): finite Gumbel noise (a 24-bit uniform rounded up to 1.0)
    extreme = torch.tensor([[-1, 0, 2 ** 31 - 1, -(2 ** 31)]], dtype=torch.int32)
    assert torch.isfinite(_gumbel_from_bits(extreme.clone(), torch.empty_like(extreme))).all()


@pytest.mark.gpu
def test_keyed_bits_equal_on_cuda():
    keys = row_keys(list(range(8)), list(range(8)), "cpu")
    tokens = torch.arange(151_936)
    assert torch.equal(keyed_bits(keys.cuda(), tokens.cuda()).cpu(), keyed_bits(keys, tokens))


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[bool, float]:
    assert counts[probs == 0].sum() == 0, "a removed token was drawn"
    support = probs > 0
    expected = probs[support] * n
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    df = max(int(support.sum()) - 1, 1)
    critical = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3  # 0.001 upper quantile
    return chi2 < critical, chi2


_LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -1.0, 0.7, 0.0, 1.49, -3.0])
_HISTORY = [0, 2, 2, 5, 6, 6, 6]  # the last 4 are the generated output


def _stock_expected(kw: dict) -> torch.Tensor:
    s = _LOGITS[None].clone()
    if kw.get("repetition_penalty", 1.0) != 1.0:
        s = RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"])(torch.tensor([_HISTORY]), s)
    counts = torch.bincount(torch.tensor(_HISTORY[-4:]), minlength=10).float()
    s = s - kw.get("presence_penalty", 0.0) * (counts > 0) - kw.get("frequency_penalty", 0.0) * counts
    for tok, bias in (kw.get("logit_bias") or {}).items():
        s[0, tok] += bias
    warpers = [TemperatureLogitsWarper(kw["temperature"])]
    warpers += [TopKLogitsWarper(kw["top_k"])] if kw.get("top_k") else []
    warpers += [TopPLogitsWarper(kw["top_p"])] if kw.get("top_p", 1.0) < 1.0 else []
    warpers += [MinPLogitsWarper(kw["min_p"])] if kw.get("min_p") else []
    for w in warpers:
        s = w(None, s)
    return torch.softmax(s[0], -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", [
    dict(temperature=1.0),
    dict(temperature=0.6, top_k=4),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.9, min_p=0.2),
    dict(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05),
    dict(temperature=1.0, repetition_penalty=1.5, top_p=0.95),
    dict(temperature=0.7, presence_penalty=0.8, frequency_penalty=0.4, logit_bias={9: 4.0, 0: -1.0}),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_distribution_equals_transformers_processors(device, kw):
    n = 6000
    params = SamplingParams(max_new_tokens=8, **kw)
    rows = [RowState(params, position=4, seed=s, history=_HISTORY) for s in range(n)]
    tokens = sample(_LOGITS.to(device).expand(n, -1).contiguous(), rows)
    ok, chi2 = _chi2_ok(torch.bincount(tokens, minlength=10).float(), _stock_expected(kw), n)
    assert ok, chi2


def test_penalties_and_bias_arithmetic():
    """Presence/frequency count the generated output only (not the prompt); bias adds; greedy rows see them."""
    logits = torch.zeros(1, 6)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={4: 2.0, 5: -100.0})
    result = sample(logits, [RowState(p, position=3, seed=0, history=[1, 1, 2, 2, 2, 3])], return_scores=True)
    assert result.scores(0).tolist() == [0.0, 0.0, -1.0, -0.75, 2.0, -100.0]
    assert result.tokens.tolist() == [4]


def test_repetition_penalty_and_min_new_tokens_bitwise_like_transformers():
    """Rows with different penalties and histories (duplicates, lengths) in one batch: each row's processed
    scores equal transformers' processors on that row alone, bit for bit."""
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 300, generator=g) * 3
    hists = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (1, 7, 40, 40, 3, 12)]
    pens = [1.3, 0.7, 1.0, 1.15, 2.0, 1.3]
    rows = [RowState(SamplingParams(repetition_penalty=p, min_new_tokens=4), position=i, seed=0, history=h,
                     eos_ids=(7, 9)) for i, (p, h) in enumerate(zip(pens, hists))]
    result = sample(logits, rows, return_scores=True)
    for i, (p, h) in enumerate(zip(pens, hists)):
        want = logits[i:i + 1]
        if p != 1.0:
            want = RepetitionPenaltyLogitsProcessor(p)(torch.tensor([h]), want)
        want = MinNewTokensLengthLogitsProcessor(0, 4, [7, 9])(torch.zeros(1, i, dtype=torch.long), want)
        assert torch.equal(result.scores(i), want[0]), i
        assert int(result.tokens[i]) == int(want.argmax())


@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 5e-324, 1e-30])
def test_tiny_temperature_never_nan(temperature):
    """Issue 18 item 5: scores / T overflowed to inf and NaN, and token 0 came out forever."""
    logits = torch.tensor([[1.0, 3.0, -2.0, 2.999], [-5.0, -4.0, -7.0, -4.5]])
    rows = [RowState(SamplingParams(temperature=temperature, top_p=0.9), position=0, seed=s) for s in range(2)]
    result = sample(logits, rows, return_scores=True)
    assert result.tokens.tolist() == [1, 1]
    assert not any(torch.isnan(result.scores(i)).any() for i in range(2))
    # a tie at the maximum stays a tie: both tokens are drawn across seeds
    tie = torch.tensor([[4.0, 0.0, 4.0]])
    drawn = {int(sample(tie, [RowState(SamplingParams(temperature=temperature), 0, s)])[0]) for s in range(40)}
    assert drawn == {0, 2}


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("presence_penalty", float("nan")), ("frequency_penalty", -3),
    ("frequency_penalty", "1"), ("logit_bias", {-1: 1.0}), ("logit_bias", {3: 100.5}),
    ("logit_bias", {3: float("nan")}), ("logit_bias", {True: 1.0}), ("logit_bias", [(1, 2.0)]),
])
def test_bad_penalty_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@functools.cache
def _tiny():
    from hf_turbo.testing import tiny_model

    return tiny_model("llama", seed=0, vocab_size=512)


def test_logit_bias_outside_vocabulary_is_refused_by_the_engine():
    import hf_turbo

    model = _tiny()
    try:
        engine = hf_turbo.Engine(model, num_blocks=64)
        with pytest.raises(ValueError, match="logit_bias"):
            engine.add_request([1, 2, 3], SamplingParams(logit_bias={512: 1.0}))
        assert not engine.requests and engine.pool.num_free == engine.pool.num_blocks
    finally:
        hf_turbo.restore(model)
