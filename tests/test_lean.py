"""The lean forward (engine/lean.py): bitwise the model's own forward, checked before use, off where it must be."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import hf_turbo
from hf_turbo import Engine, SamplingParams
from hf_turbo.engine.lean import FAMILIES, LeanForward
from hf_turbo.testing import tiny_model

PROMPTS = [[5, 9, 13, 2, 7, 7, 30], [3, 4], list(range(10, 45)), [21] * 17]
NEW = 10


def _stock(model) -> list[list[int]]:
    outs = []
    for p in PROMPTS:
        seq = model.generate(input_ids=torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             pad_token_id=0)
        outs.append(seq[0, len(p):].tolist())
    return outs


def _engine_tokens(engine: Engine) -> list[list[int]]:
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, min_new_tokens=NEW), use_tqdm=False)
    assert engine.pool.num_free == engine.pool.num_blocks
    return [o.token_ids for o in outs]


class _Counting:
    """Wraps a LeanForward and counts the forwards it runs."""

    def __init__(self, lean: LeanForward) -> None:
        self.lean, self.calls = lean, 0

    def usable(self) -> bool:
        return self.lean.usable()

    def __call__(self, *args):
        self.calls += 1
        return self.lean(*args)


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_lean_forward_runs_and_equals_stock(arch):
    model = tiny_model(arch)
    stock = _stock(model)
    engine = Engine(model, config=hf_turbo.TurboConfig(debug_checks=True))
    assert engine.runner.lean is not None, LeanForward.why_not(model)
    counting = engine.runner.lean = _Counting(engine.runner.lean)
    assert _engine_tokens(engine) == stock
    assert engine.runner.lean_verified  # its logits matched the model's bit for bit on the first step
    assert counting.calls >= NEW  # and it ran the decode steps after that


def test_mixed_steps_through_lean_forward_equal_stock():
    """Chunked prefills beside decodes (a step of several kinds) go through the lean forward too."""
    model = tiny_model("qwen3")
    stock = _stock(model)
    engine = Engine(model, config=hf_turbo.TurboConfig(max_num_batched_tokens=8, max_num_seqs=3))
    assert _engine_tokens(engine) == stock and engine.runner.lean_verified


def test_a_lean_forward_that_differs_is_dropped(caplog, monkeypatch):
    """A planted difference (no rotary embedding) fails the check: a warning, the model's forward, same tokens."""
    from hf_turbo.backends import STOCK_OPS

    model = tiny_model("llama")
    stock = _stock(model)
    engine = Engine(model)
    engine.runner.lean.apply_rope = lambda q, k, cos, sin: (q, k)
    # make the lean forward take apply_rope (not a backend's one-call rope)
    monkeypatch.setattr(engine.backend, "fused_ops", lambda model, hidden: STOCK_OPS)
    with caplog.at_level(logging.WARNING, logger="hf_turbo.engine.runner"):
        tokens = _engine_tokens(engine)
    assert tokens == stock
    assert engine.runner.lean is None and not engine.runner.lean_verified
    assert "lean forward is off" in caplog.text and "differ" in caplog.text


def test_a_lean_forward_that_raises_is_dropped(caplog):
    model = tiny_model("mistral")
    stock = _stock(model)
    engine = Engine(model)

    class Broken(_Counting):
        def __call__(self, *args):
            raise IndexError("planted")

    engine.runner.lean = Broken(engine.runner.lean)
    with caplog.at_level(logging.WARNING, logger="hf_turbo.engine.runner"):
        assert _engine_tokens(engine) == stock
    assert engine.runner.lean is None and "IndexError: planted" in caplog.text


def test_the_first_step_is_checked_on_a_scratch_cache_then_runs_lean():
    """Even a first step that is a big prefill runs lean: the check uses two short sequences on its own cache."""
    model = tiny_model("llama")
    stock = _stock(model)
    engine = Engine(model)
    counting = engine.runner.lean = _Counting(engine.runner.lean)
    model_calls = []
    model_forward = engine.runner._model_forward
    engine.runner._model_forward = lambda *a: model_calls.append(a[-1].cache) or model_forward(*a)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=NEW, min_new_tokens=NEW)) for p in PROMPTS]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    for out in engine.step():  # the prefill of all four prompts: 61 tokens
        tokens[out.request_id] = list(out.token_ids)
    assert engine.runner.lean_verified and counting.calls == 2  # the check's forward, then the step's
    assert len(model_calls) == 1 and model_calls[0] is not engine.cache  # the model ran once, on the scratch
    steps = 1
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] = list(out.token_ids)
        steps += 1
    assert counting.calls == steps + 1 and len(model_calls) == 1
    assert [tokens[i] for i in ids] == stock


@pytest.mark.parametrize("arch", ["gemma", "phi3", "gpt2"])
def test_other_architectures_call_the_model(arch):
    model = tiny_model(arch)
    assert "model_type" in LeanForward.why_not(model)
    assert Engine(model).runner.lean is None


@pytest.mark.cpu_backend
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_one_call_norms_and_silu_equal_stock(arch, monkeypatch):
    """On the CPU the lean forward's RMSNorms (and Qwen3's q/k norms) and its MLP's silu(gate) * up are the
    extension's one-call versions."""
    from hf_turbo.backends.cpu import ext as cpu_ops

    one_call, silu_mul = cpu_ops.rms_norm(), cpu_ops.silu_mul()
    if one_call is None or silu_mul is None:
        pytest.skip("the extension's RMSNorm or silu_mul is not available here")
    calls, silu_calls = [], []
    counted_norm = lambda x, w, eps: calls.append(x.shape) or one_call(x, w, eps)  # noqa: E731
    counted_silu = lambda g, u: silu_calls.append(g.shape) or silu_mul(g, u)  # noqa: E731
    monkeypatch.setattr(cpu_ops, "rms_norm", lambda: counted_norm)  # what the CPU backend's ops take
    monkeypatch.setattr(cpu_ops, "silu_mul", lambda: counted_silu)
    model = tiny_model(arch)
    stock = _stock(model)
    engine = Engine(model, config=hf_turbo.TurboConfig(debug_checks=True))
    assert _engine_tokens(engine) == stock and engine.runner.lean_verified
    layers = model.config.num_hidden_layers
    per_forward = 2 * layers + 1 + (2 * layers if arch == "qwen3" else 0)
    assert len(calls) >= per_forward * NEW  # every norm of every lean forward
    assert len(silu_calls) >= layers * NEW  # every MLP
    if arch == "qwen3":
        assert any(len(shape) == 4 for shape in calls)  # the per-head q/k norms


def test_projections_replaced_after_the_check_are_followed():
    """A projection swapped in later is what the lean forward uses: a new nn.Linear, or an adapter module."""
    model = tiny_model("llama")
    # no prefix cache: its blocks would hold K/V computed with the old weights
    engine = Engine(model, config=hf_turbo.TurboConfig().replace(enable_prefix_caching=False))
    _engine_tokens(engine)
    assert engine.runner.lean_verified

    class Scaled(nn.Linear):  # an adapter-like subclass: its own forward
        def forward(self, x):
            return super().forward(x) * 1.5

    attn = model.model.layers[0].self_attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        attn.q_proj = nn.Linear(attn.q_proj.in_features, attn.q_proj.out_features, bias=False)
        scaled = Scaled(attn.v_proj.in_features, attn.v_proj.out_features, bias=False)
    with torch.no_grad():
        scaled.weight.copy_(attn.v_proj.weight)
    attn.v_proj = scaled
    stock = _stock(model)
    assert _engine_tokens(engine) == stock and engine.runner.lean is not None


def test_hooks_and_replaced_modules_turn_it_off():
    model = tiny_model("llama")
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert "hooks" in LeanForward.why_not(model)
    handle.remove()
    assert LeanForward.why_not(model) is None

    old = model.model.layers[0].self_attn.v_proj
    model.model.layers[0].self_attn.v_proj = nn.Sequential(old)  # an adapter that is not an nn.Linear
    assert "not an nn.Linear" in LeanForward.why_not(model)
    model.model.layers[0].self_attn.v_proj = old
    old = model.model.layers[1].mlp.down_proj  # the lean forward calls the MLP's projections itself too
    model.model.layers[1].mlp.down_proj = nn.Sequential(old)
    assert "not an nn.Linear" in LeanForward.why_not(model)
    model.model.layers[1].mlp.down_proj = old
    model.model.norm.forward = lambda x: x  # an instance-level patch, as offloading hooks do
    assert "patched forward" in LeanForward.why_not(model)


def test_linear_subclass_runs_its_own_forward():
    """A subclass of nn.Linear (a quantizer's layer) keeps the lean forward, which calls the layer's own forward:
    a subclass computing something else than F.linear still gives the model's logits bit for bit."""

    class Shifted(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 0.25

    model = tiny_model("llama")
    old = model.model.layers[1].mlp.down_proj
    model.model.layers[1].mlp.down_proj = Shifted(old.in_features, old.out_features, bias=False)
    model.model.layers[1].mlp.down_proj.weight = old.weight
    assert LeanForward.why_not(model) is None
    assert "Shifted" in LeanForward.describe(model)
    engine = Engine(model)
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10, 11]]
    got = [o.token_ids for o in engine.generate(prompts, hf_turbo.SamplingParams(max_new_tokens=6))]
    assert engine.runner.lean_verified
    want = [model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p):].tolist() for p in prompts]
    assert got == want
    engine.close()


def test_config_switch():
    model = tiny_model("llama")
    assert Engine(model, config=hf_turbo.TurboConfig(lean_forward=False)).runner.lean is None
    with pytest.raises(ValueError, match="lean_forward"):
        hf_turbo.TurboConfig(lean_forward="yes")


def test_fixture_model_through_lean_forward():
    """The fixture (a trained Llama) on real Python prompts: lean engine == stock, decode steps ran lean."""
    from hf_turbo.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("fixture")
    prompts = ["def fibonacci(n):\n", "import os\nimport sys\n\n\nclass Config:\n", "for i in range(10):\n    "]
    ids = [tok(p)["input_ids"] for p in prompts]
    stock = [model.generate(input_ids=torch.tensor([p]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                            pad_token_id=tok.pad_token_id)[0, len(p):].tolist() for p in ids]
    engine = Engine(model, tok)
    counting = engine.runner.lean = _Counting(engine.runner.lean)
    outs = engine.generate(ids, SamplingParams(max_new_tokens=24, min_new_tokens=24), use_tqdm=False)
    assert [o.token_ids for o in outs] == stock
    assert engine.runner.lean_verified and counting.calls >= 23
