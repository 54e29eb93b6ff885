"""generate() as a drop-in on what transformers' own generation tests exercise: masks with holes and
right padding, the returned cache and a continued one, position_ids and logits_to_keep; each against
stock generate() on several architectures (fp32, greedy). Per-row processors: test_generate_processors.py."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import DynamicCache

import hf_turbo
from hf_turbo.eval.exactness import generate_both, masked_batch
from hf_turbo.patches.compat import cache_kwarg_name
from hf_turbo.testing import tiny_model

ARCHS = ["llama", "qwen3", "gpt2", "gemma2"]


def _cache(out):
    return getattr(out, cache_kwarg_name())


@pytest.mark.parametrize("arch", ARCHS)
def test_mask_holes_and_left_padding_run_on_the_engine(arch):
    model = tiny_model(arch)
    ids, mask = masked_batch(model.config.vocab_size)
    kw = dict(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    stock, fast, fallbacks = generate_both(model, attention_mask=mask, **kw)
    assert torch.equal(stock, fast)
    if arch == "gemma2":  # stock measures its sliding window in columns, holes included: stock runs it
        assert any("sliding window" in m for m in fallbacks)
        _, mask = masked_batch(model.config.vocab_size, holes=False)  # left padding alone runs on the engine
        stock, fast, fallbacks = generate_both(model, attention_mask=mask, **kw)
        assert torch.equal(stock, fast)
    assert not fallbacks


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_right_padding_falls_back_to_stock_with_a_log_line(arch):
    model = tiny_model(arch)
    ids, mask = masked_batch(model.config.vocab_size)
    mask[2, 8:] = 0  # right padding
    stock, fast, fallbacks = generate_both(model, input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                           do_sample=False, pad_token_id=0)
    assert any("right padding" in m for m in fallbacks)
    assert torch.equal(stock, fast)


def _early_eos(model, ids, mask) -> int:
    """A token stock emits at step 2 of row 0: as EOS it makes that row stop early (pad tail)."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    return int(out[0, ids.shape[1] + 2])


@pytest.mark.parametrize("arch", ARCHS)
def test_returned_cache_is_stocks(arch):
    model = tiny_model(arch)
    ids, mask = masked_batch(model.config.vocab_size, seed=1, holes=arch != "gemma2")
    eos = _early_eos(model, ids, mask)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0,
              eos_token_id=eos, return_dict_in_generate=True, output_scores=True)
    stock, fast, fallbacks = generate_both(model, **kw)
    assert not fallbacks
    assert torch.equal(stock.sequences, fast.sequences)
    assert (fast.sequences[0, ids.shape[1]:] == 0).any(), "row 0 should have stopped early"
    s_cache, f_cache = _cache(stock), _cache(fast)
    assert type(f_cache) is type(s_cache) is DynamicCache
    assert [type(x) for x in f_cache.layers] == [type(x) for x in s_cache.layers]
    full = torch.cat([mask, torch.ones(mask.shape[0], stock.sequences.shape[1] - mask.shape[1],
                                       dtype=mask.dtype)], dim=1)
    for s_layer, f_layer in zip(s_cache.layers, f_cache.layers):
        assert f_layer.keys.shape == s_layer.keys.shape
        cols = full[:, -s_layer.keys.shape[2] - 1:-1].bool()  # the columns each layer keeps, minus the last
        for i in range(ids.shape[0]):  # attended columns only: masked ones hold what nobody reads
            for a, b in ((s_layer.keys, f_layer.keys), (s_layer.values, f_layer.values)):
                torch.testing.assert_close(b[i][:, cols[i]], a[i][:, cols[i]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_continuing_a_returned_cache_equals_stock(arch, caplog):
    model = tiny_model(arch)
    ids, mask = masked_batch(model.config.vocab_size, seed=2)
    first = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                 return_dict_in_generate=True)
    stock1 = model.generate(ids, **first)
    hf_turbo.accelerate(model)
    try:
        fast1 = model.generate(ids, **first)
    finally:
        hf_turbo.restore(model)
    assert torch.equal(stock1.sequences, fast1.sequences)
    seqs = stock1.sequences
    mask2 = torch.cat([mask, torch.ones(mask.shape[0], seqs.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    again = dict(attention_mask=mask2, max_new_tokens=6, do_sample=False, pad_token_id=0)
    # the imported K/V is what the engine attends to: a scaled cache changes the tokens, as it does in stock
    # (copies made first: stock extends a cache it continues in place)
    stock_half, fast_half = _scaled(model, _cache(stock1), 0.5), _scaled(model, _cache(fast1), 0.5)
    stock2 = model.generate(seqs, **again, **{cache_kwarg_name(): _cache(stock1)})
    stock_zero = model.generate(seqs, **again, **{cache_kwarg_name(): stock_half})
    hf_turbo.accelerate(model)
    try:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hf_turbo"):
            fast2 = model.generate(seqs, **again, **{cache_kwarg_name(): _cache(fast1)})
            fast_zero = model.generate(seqs, **again, **{cache_kwarg_name(): fast_half})
        assert not [r for r in caplog.records if "falls back" in r.getMessage()]
        hf_turbo.get_engine(model).check_invariants()
    finally:
        hf_turbo.restore(model)
    assert torch.equal(stock2, fast2)
    assert torch.equal(stock_zero, fast_zero)
    assert not torch.equal(fast_zero, fast2)


def _scaled(model, cache, factor: float) -> DynamicCache:
    out = DynamicCache(config=model.config)
    for layer, x in enumerate(cache.layers):
        out.update(x.keys * factor, x.values * factor, layer)
    return out


def test_position_ids_and_logits_to_keep():
    model = tiny_model("llama")
    ids, mask = masked_batch(model.config.vocab_size, seed=5)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    base = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    stock, fast, fallbacks = generate_both(model, **base, position_ids=positions, logits_to_keep=1)
    assert not fallbacks and torch.equal(stock, fast)
    # positions that are not stock's own go to stock generate()
    stock, fast, fallbacks = generate_both(model, **base, position_ids=positions + 3)
    assert any("position_ids" in m for m in fallbacks) and torch.equal(stock, fast)


def test_use_cache_false_returns_no_cache():
    model = tiny_model("llama")
    ids, mask = masked_batch(model.config.vocab_size, seed=6)
    stock, fast, fallbacks = generate_both(model, input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                  do_sample=False, pad_token_id=0, return_dict_in_generate=True, use_cache=False)
    assert not fallbacks and torch.equal(stock.sequences, fast.sequences)
    assert _cache(stock) is None and _cache(fast) is None


def test_bad_past_key_values_falls_back(caplog):
    """A cache as long as the input leaves the engine nothing to compute: stock generate() takes the call,
    so the accelerated call ends exactly as stock's does (its tokens, or its error type)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(7))

    def full_cache() -> DynamicCache:
        cache = DynamicCache(config=model.config)
        for layer in range(model.config.num_hidden_layers):
            cache.update(torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16), layer)
        return cache

    def outcome():
        try:
            return model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0,
                                  **{cache_kwarg_name(): full_cache()})
        except Exception as exc:
            return type(exc)

    stock = outcome()
    hf_turbo.accelerate(model)
    try:
        with caplog.at_level(logging.INFO, logger="hf_turbo"):
            fast = outcome()
    finally:
        hf_turbo.restore(model)
    assert any("past_key_values" in r.getMessage() for r in caplog.records)
    assert type(fast) is type(stock)
    assert fast is stock if isinstance(stock, type) else torch.equal(fast, stock)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_inputs_embeds_run_on_the_engine(arch):
    model = tiny_model(arch)
    ids, mask = masked_batch(model.config.vocab_size, seed=8)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():  # vectors that no token has, so a run that ignored them could not match
        embeds = model.get_input_embeddings()(ids) + 0.5 * torch.randn(*ids.shape, model.config.hidden_size,
                                                                       generator=g)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    plain = model.generate(input_ids=ids, **kw)
    stock, fast, fallbacks = generate_both(model, input_ids=ids, inputs_embeds=embeds, **kw)
    assert not fallbacks and torch.equal(stock, fast) and not torch.equal(stock, plain)
    # embeddings alone: stock returns only the new tokens
    stock, fast, fallbacks = generate_both(model, inputs_embeds=embeds, return_dict_in_generate=True, **kw)
    assert not fallbacks and stock.sequences.shape[1] == 6 and torch.equal(stock.sequences, fast.sequences)
    for s_layer, f_layer in zip(_cache(stock).layers, _cache(fast).layers):  # the prompt's K/V from its vectors
        assert f_layer.keys.shape == s_layer.keys.shape
        cols = mask[0].bool()
        torch.testing.assert_close(f_layer.keys[0][:, : ids.shape[1]][:, cols],
                                   s_layer.keys[0][:, : ids.shape[1]][:, cols], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "codegen"])
def test_token_type_ids_run_on_the_engine(arch):
    model = tiny_model(arch)
    try:  # codegen is refused on transformers 5.17 (no attention interface there)
        hf_turbo.restore(hf_turbo.accelerate(model))
    except ValueError as exc:
        pytest.skip(f"{arch} is refused on this transformers: {exc}")
    ids, mask = masked_batch(model.config.vocab_size, seed=9, holes=False)
    types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(9))
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    plain = model.generate(**kw)
    stock, fast, fallbacks = generate_both(model, token_type_ids=types, **kw)
    assert not fallbacks and torch.equal(stock, fast) and not torch.equal(stock, plain)
