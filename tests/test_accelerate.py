"""accelerate()/restore() and the drop-in generate(): token-exact with stock in fp32."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from packaging.version import Version

import hf_turbo
from hf_turbo.engine.attach import uses_attention_interface as _uses_attention_interface
from hf_turbo.eval.exactness import explain_divergence, left_pad, stock_and_accelerated
from hf_turbo.patches.compat import TRANSFORMERS_VERSION, forward_cache_kwargs
from hf_turbo.testing import TINY_ARCHS, tiny_model


def _prompts(vocab: int, lengths=(5, 9, 3, 12), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab - 1, (n,), generator=g).tolist() for n in lengths]


def _assert_same_generation(model, stock: torch.Tensor, fast: torch.Tensor, prompts, width: int) -> None:
    if torch.equal(stock, fast):
        return
    problems = []
    for row, prompt in enumerate(prompts):
        div = explain_divergence(model, prompt, stock[row, width:].tolist(), fast[row, width:].tolist(), row)
        if div is None:
            continue
        kind = "near-tie" if div.near_tie else "BUG"
        print(f"row {row}: {kind} at new token {div.position}: stock {div.stock_token} vs turbo "
              f"{div.turbo_token}, stock top-2 gap {div.top2_gap:.3g}")
        if not div.near_tie:
            problems.append(div)
    assert not problems, f"accelerated output diverges from stock (not a near-tie): {problems}"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_generate_matches_stock_greedy(arch):
    model = tiny_model(arch)
    if not _uses_attention_interface(model):
        # transformers < 5.2x: gptj/codegen run a private attention; refusing them is the contract
        assert TRANSFORMERS_VERSION < Version("5.24") and arch in ("gptj", "codegen")
        with pytest.raises(ValueError, match="attention interface"):
            hf_turbo.accelerate(model)
        return
    prompts = _prompts(model.config.vocab_size)
    pad = 0
    ids, mask = left_pad(prompts, pad)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=pad)
    stock = model.generate(**kw)
    hf_turbo.accelerate(model)
    try:
        fast = model.generate(**kw)
        assert fast.shape == stock.shape and fast.dtype == stock.dtype
        _assert_same_generation(model, stock, fast, prompts, ids.shape[1])
        engine = hf_turbo.get_engine(model)
        engine.check_invariants()
        assert not engine.scheduler.running and not engine.scheduler.waiting
        assert engine.pool.num_free == engine.pool.num_blocks  # nothing leaked (cached blocks are free)
    finally:
        hf_turbo.restore(model)


def test_restore_is_exact():
    model = tiny_model("qwen2")
    reference = copy.deepcopy(model)
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    before_cfg = model.config.to_dict()
    before_attn = model.config._attn_implementation
    hf_turbo.accelerate(model)
    assert hf_turbo.accelerate(model) is model  # twice is a no-op
    assert model.config._attn_implementation == "hf_turbo"
    ids = torch.tensor([[5, 6, 7, 8]])
    model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    hf_turbo.restore(model)
    assert "generate" not in model.__dict__ and not hasattr(model, "_hf_turbo")
    assert model.config._attn_implementation == before_attn
    assert model.config.to_dict() == before_cfg
    after_sd = model.state_dict()
    assert before_sd.keys() == after_sd.keys()
    assert all(torch.equal(before_sd[k], after_sd[k]) for k in before_sd)
    kw = dict(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**kw), reference.generate(**kw))
    x = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(model(x).logits, reference(x).logits)
    with pytest.raises(ValueError, match="not accelerated"):
        hf_turbo.restore(model)


def test_fixture_real_prompts_identical():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_turbo.testing import fixture_path

    path = fixture_path("target")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = [
        "def main():\n", "import os\n", "class Foo(object):\n    def __init__(self", "for i in range(",
        "    return self.", "if __name__ == '__main__':\n", "try:\n    import", "def __repr__(self):\n",
        "@property\ndef name(self):\n", "with open(path) as f:\n", "    raise ValueError(", "x = [",
        "from collections import", "while True:\n", "    def test_", "# Copyright",
    ]
    prompts = [tok(t)["input_ids"] for t in texts]
    pad = tok.pad_token_id
    ids, mask = left_pad(prompts, pad)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False, pad_token_id=pad)
    stock = model.generate(**kw)
    hf_turbo.accelerate(model)
    try:
        fast = model.generate(**kw)
        _assert_same_generation(model, stock, fast, prompts, ids.shape[1])
    finally:
        hf_turbo.restore(model)


def test_scores_logits_and_min_new_tokens_match_stock():
    model = tiny_model("llama")
    eos = 7
    model.generation_config.eos_token_id = eos
    prompts = _prompts(model.config.vocab_size, (4, 6))
    ids, mask = left_pad(prompts, 0)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=3, do_sample=False,
              pad_token_id=0, return_dict_in_generate=True, output_scores=True, output_logits=True,
              repetition_penalty=1.3)
    stock, fast = stock_and_accelerated(model, **kw)
    assert torch.equal(stock.sequences, fast.sequences)
    assert len(stock.scores) == len(fast.scores) == len(fast.logits)
    for s, f in zip(stock.scores, fast.scores):
        torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-5)


def test_max_length_and_eos_list_and_stop_strings():
    from transformers import AutoTokenizer

    from hf_turbo.testing import fixture_path

    tok = AutoTokenizer.from_pretrained(fixture_path("target"))
    model = tiny_model("llama", vocab_size=len(tok))
    ids = torch.tensor([tok("def f(x):\n")["input_ids"]])
    kws = [
        dict(max_length=ids.shape[1] + 9),
        dict(max_new_tokens=12, eos_token_id=[3, 9, 11]),
        dict(max_new_tokens=20, stop_strings=["e"], tokenizer=tok),
    ]
    stock = [model.generate(input_ids=ids, do_sample=False, pad_token_id=0, **kw) for kw in kws]
    hf_turbo.accelerate(model)
    try:
        fast = [model.generate(input_ids=ids, do_sample=False, pad_token_id=0, **kw) for kw in kws]
    finally:
        hf_turbo.restore(model)
    for s, f in zip(stock, fast):
        assert torch.equal(s, f)


def test_streamer_gets_every_token():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    model = tiny_model("llama")
    ids = torch.tensor([[4, 5, 6]])
    hf_turbo.accelerate(model)
    try:
        s = Collect()
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0, streamer=s)
    finally:
        hf_turbo.restore(model)
    assert s.ended and s.chunks[0] == [4, 5, 6]
    assert sum(s.chunks[1:], []) == out[0, 3:].tolist()


def test_fallback_to_stock_logs_the_argument(caplog):
    model = tiny_model("llama")
    ids = torch.tensor([[4, 5, 6, 7]])
    kw = dict(input_ids=ids, max_new_tokens=6, num_beams=2, do_sample=False, pad_token_id=0)
    stock = model.generate(**kw)
    hf_turbo.accelerate(model)
    try:
        with caplog.at_level(logging.INFO, logger="hf_turbo"):
            fast = model.generate(**kw)
        assert model.config._attn_implementation == "hf_turbo"
    finally:
        hf_turbo.restore(model)
    assert torch.equal(stock, fast)
    assert any("num_beams" in r.getMessage() for r in caplog.records)


def test_seeded_sampling_reproducible_and_batch_independent():
    model = tiny_model("llama")
    hf_turbo.accelerate(model)
    try:
        engine = hf_turbo.get_engine(model)
        p = hf_turbo.SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=123)
        prompt = [5, 6, 7, 8, 9]
        alone = engine.generate([prompt], p, use_tqdm=False)[0].token_ids
        again = engine.generate([prompt], p, use_tqdm=False)[0].token_ids
        others = [[11, 12, 13], list(range(20, 45)), [3]]
        batched = engine.generate(others[:2] + [prompt] + others[2:],
                                  [hf_turbo.SamplingParams(max_new_tokens=9, temperature=1.0, seed=9)] * 2
                                  + [p] + [hf_turbo.SamplingParams(max_new_tokens=5)], use_tqdm=False)
    finally:
        hf_turbo.restore(model)
    assert alone == again == batched[2].token_ids
    assert len(set(alone)) > 1


def test_sampling_distribution_chi_square():
    """Over many keyed draws, token frequencies follow softmax(logits / T) after top-k/top-p."""
    from hf_turbo.sampling import RowState, SamplingParams, sample

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -0.5, -1.0, 0.7, 0.0]])
    params = SamplingParams(max_new_tokens=1, temperature=0.8, top_k=6, top_p=0.95)
    n = 4000
    rows = [RowState(params, position=i, seed=42) for i in range(n)]
    tokens = sample(logits.expand(n, -1).contiguous(), rows)
    # expected distribution, computed independently of the sampler
    scaled = logits[0] / 0.8
    order = torch.argsort(scaled, descending=True)
    keep = torch.zeros(8, dtype=torch.bool)
    keep[order[:6]] = True
    probs = torch.softmax(scaled.masked_fill(~keep, -math.inf), -1)
    sorted_p, idx = torch.sort(probs)
    cum = sorted_p.cumsum(0)
    drop = cum <= 0.05
    drop[-1] = False
    probs[idx[drop]] = 0
    probs = probs / probs.sum()
    counts = torch.bincount(tokens, minlength=8).float()
    assert counts[probs == 0].sum() == 0  # filtered tokens never drawn
    support = probs > 0
    expected = probs[support] * n
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    # 99.9% quantile of chi-square is below dof + 4.5*sqrt(2*dof) + 6 for small dof
    assert chi2 < dof + 4.5 * math.sqrt(2 * dof) + 6, (chi2, dof, counts, expected)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(do_sample=True, temperature=-0.5), "temperature"),
    (dict(do_sample=True, temperature=float("nan")), "temperature"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
])
def test_bad_generate_arguments(kwargs, match):
    model = tiny_model("llama")
    hf_turbo.accelerate(model)
    try:
        with pytest.raises(ValueError, match=match):
            model.generate(input_ids=torch.tensor([[4, 5, 6]]), pad_token_id=0, **kwargs)
        out = model.generate(input_ids=torch.tensor([[4, 5, 6]]), max_new_tokens=3, pad_token_id=0)
        assert out.shape == (1, 6)  # still serving
    finally:
        hf_turbo.restore(model)


def test_bad_prompts():
    model = tiny_model("llama", max_position_embeddings=64)
    # a row with no attended token is stock's business (it ends masked: right padding)
    empty = dict(input_ids=torch.tensor([[4, 5], [0, 0]]), attention_mask=torch.tensor([[1, 1], [0, 0]]),
                 max_new_tokens=3, pad_token_id=0)
    stock = model.generate(**empty)
    hf_turbo.accelerate(model)
    try:
        assert torch.equal(model.generate(**empty), stock)
        with pytest.raises(ValueError, match="maximum length 64"):
            model.generate(input_ids=torch.ones((1, 60), dtype=torch.long), max_new_tokens=10, pad_token_id=0)
        engine = hf_turbo.get_engine(model)
        assert engine.pool.num_free == engine.pool.num_blocks and not engine.has_unfinished()
    finally:
        hf_turbo.restore(model)


def test_encoder_decoder_and_non_models_rejected():
    from transformers import AutoModelForSeq2SeqLM, T5Config

    t5 = AutoModelForSeq2SeqLM.from_config(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                                                    vocab_size=64))
    with pytest.raises(ValueError, match="'t5' is an encoder-decoder"):
        hf_turbo.accelerate(t5)
    with pytest.raises(ValueError, match="PreTrainedModel"):
        hf_turbo.accelerate(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("arch", ["llama", "gemma2", "mistral", "gpt2"])
def test_attn_implementation_hf_turbo_plain_forward(arch):
    from transformers import DynamicCache

    ref = tiny_model(arch)
    model = tiny_model(arch, attn_implementation="hf_turbo")
    assert model.config._attn_implementation == "hf_turbo"
    x = torch.randint(3, 200, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # left padding in row 1
    torch.testing.assert_close(model(x, attention_mask=mask).logits, ref(x, attention_mask=mask).logits,
                               rtol=1e-5, atol=1e-5)
    # with a DynamicCache: prefill then one decode step
    c1, c2 = DynamicCache(config=model.config), DynamicCache(config=ref.config)
    a = model(x[:, :15], attention_mask=mask[:, :15], **forward_cache_kwargs(c1))
    b = ref(x[:, :15], attention_mask=mask[:, :15], **forward_cache_kwargs(c2))
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    a = model(x[:, 15:16], attention_mask=mask[:, :16], **forward_cache_kwargs(c1))
    b = ref(x[:, 15:16], attention_mask=mask[:, :16], **forward_cache_kwargs(c2))
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
