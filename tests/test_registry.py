"""The registry sweep and the accelerate() probe: every architecture exact or refused, never silently wrong.

The fast tests run one model type per distinct attention/cache code path found by the sweep; the full
sweep over every causal-LM type of the installed transformers is ``slow``.
"""

from __future__ import annotations

import re

import pytest
import torch

import hf_turbo
from hf_turbo.engine.probe import probe_packed_forward
from hf_turbo.eval.cli import run_registry
from hf_turbo.eval.options import registry_types
from hf_turbo.eval.registry import BUGS, RESULTS, check_model_type, format_registry_table, run_sweep
from hf_turbo.patches.attention import ATTN_NAME
from hf_turbo.testing import TINY_ARCHS, tiny_model
from hf_turbo.testing.registry import registry_config, registry_model, registry_model_types

# One model type per distinct attention/cache code path the sweep found. End to end (stock vs accelerated
# generate(), as the sweep runs it) where hf_turbo runs the model; accelerate() alone where it refuses.
IDENTICAL = {
    "llama": "the standard path: kwargs carry the context, layer_idx names the cache layer",
    "stablelm": "decoder layer drops **kwargs: the context comes from engine_forward",
    "gpt_oss": "attention sinks (s_aux): the eager op sequence per sequence, over the pools",
    "jetmoe": "K/V tiled over the heads after cache.update (repeat, not repeat_interleave)",
}
REFUSED = {
    "diffllama": "other than those it has just written",  # values split after cache.update
    "moshi": "sliding window of 8 tokens",  # a window only in its own cache, not in the attention call
    "lfm3": "raised IndexError",  # linear-attention (conv) layers keep state in the cache
    "minimax": "cache of its own",
    "bert-generation": "differ from stock's",  # bidirectional: only the logits show it
    "bloom": "attention interface",  # alibi in its own attention, no interface
    "deepseek_v3": "different (heads, dim)",  # MLA: a latent and a rotary part cached as K and V
}


@pytest.mark.parametrize("model_type", sorted(IDENTICAL))
def test_code_path_identical_to_stock(model_type):
    row = check_model_type(model_type)
    assert row.result == "identical", row


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_code_path_refused_with_reason(model_type):
    model = registry_model(model_type)
    with pytest.raises(ValueError, match=re.escape(REFUSED[model_type])):
        hf_turbo.accelerate(model)
    assert not hf_turbo.is_accelerated(model)


def test_cache_layer_comes_from_the_update_not_the_module():
    # hrm_text runs each layer once per cycle and writes cycle c of layer i to cache layer i + c * n
    model = registry_model("hrm_text")
    assert probe_packed_forward(model, lambda: model.set_attn_implementation(ATTN_NAME)) is None


def test_probe_accepts_every_test_architecture_in_bfloat16():
    # no false refusal under the 16-bit tolerance (in float32 every accelerate() in the suite runs the probe)
    for model_type in TINY_ARCHS:
        model = tiny_model(model_type, dtype=torch.bfloat16)
        attn = model.config._attn_implementation
        assert probe_packed_forward(model, lambda m=model: m.set_attn_implementation(ATTN_NAME)) is None, model_type
        model.set_attn_implementation(attn)


def test_refusal_leaves_the_model_stock():
    model = registry_model("diffllama")
    attn = model.config._attn_implementation
    ids = torch.tensor([[20, 31, 42, 53, 64]])
    before = model.generate(ids, max_new_tokens=6, do_sample=False)
    with pytest.raises(ValueError, match="diffllama.*other than those it has just written"):
        hf_turbo.accelerate(model)
    assert not hf_turbo.is_accelerated(model)
    assert model.config._attn_implementation == attn
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), before)


def test_unprobed_model_raises_instead_of_going_wrong():
    # without the probe the same checks run inside the engine's attention: an error, never other tokens
    model = registry_model("diffllama")
    hf_turbo.accelerate(model, probe=False)
    try:
        with pytest.raises(ValueError, match="other than those it has just written"):
            model.generate(torch.tensor([[20, 31, 42, 53, 64]]), max_new_tokens=4, do_sample=False)
    finally:
        hf_turbo.restore(model)


def test_registry_config_is_small_and_adapts():
    cfg = registry_config("zaya")  # refuses num_experts_per_tok=2: the builder keeps the class's default
    assert cfg.hidden_size == 64 and cfg.num_hidden_layers == 2
    assert registry_config("falcon").hidden_size == 64  # head_dim is a read-only property there: dropped
    with pytest.raises(ValueError, match="encoder"):
        registry_config("bert")
    assert "llama" in registry_model_types() and "bert" in registry_model_types()


def test_not_buildable_is_reported_not_raised():
    row = check_model_type("bart")  # encoder-decoder: in the causal-LM registry, not a decoder
    assert row.result == "not-buildable" and "encoder-decoder" in row.detail


def test_cli_table_and_validation(capsys):
    assert run_registry("registry=llama,diffllama", progress=False) == 0
    out = capsys.readouterr().out
    assert "| llama | identical |" in out and "| diffllama | refused |" in out
    assert "1 identical" in out and "1 refused" in out
    assert registry_types("registry") is None
    with pytest.raises(ValueError, match="nope"):
        registry_types("registry=llama,nope")


@pytest.mark.slow
def test_full_registry_sweep_has_no_bugs():
    rows = run_sweep()
    table = format_registry_table(rows)
    assert {r.result for r in rows} <= set(RESULTS)
    bugs = [r for r in rows if r.result in BUGS]
    assert not bugs, table
    assert sum(r.result == "identical" for r in rows) >= 80, table
