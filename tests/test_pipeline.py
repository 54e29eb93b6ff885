"""``transformers.pipeline("text-generation")`` over an accelerated model: one engine batch per list,
outputs identical to the stock pipeline (greedy), and ``restore()`` unwraps the pipeline class."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import pipeline as hf_pipeline
from transformers.pipelines.text_generation import TextGenerationPipeline

import hf_turbo
from hf_turbo.integrations import pipeline as turbo_pipeline
from hf_turbo.loading import load_model_and_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPTS = ["def add(a, b):\n", "import os\n", "class Stack:\n    def __init__(self):\n", "x = 1\n"]
CHATS = [
    [{"role": "user", "content": "def add(a, b):"}],
    [{"role": "system", "content": "Python only."}, {"role": "user", "content": "import sys"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "def f("}],  # continues the message
]
GREEDY = {"max_new_tokens": 4, "do_sample": False}
# (inputs, call kwargs, generate() calls the accelerated pipeline may make)
CASES = {
    "strings": (PROMPTS, GREEDY, 1),
    "batch_size=3 tensors": (PROMPTS, {**GREEDY, "batch_size": 3, "return_tensors": True}, 1),
    "new text only": (PROMPTS, {**GREEDY, "batch_size": 2, "return_full_text": False}, 1),
    "chats": (CHATS, {**GREEDY, "batch_size": 2}, 1),
    "stop sequence": (PROMPTS[:3], {**GREEDY, "batch_size": 2, "stop_sequence": ".."}, 1),
    "single string": (PROMPTS[2], GREEDY, 1),
    "max_length (chunk by chunk)": (PROMPTS[:3], {"max_length": 18, "do_sample": False, "batch_size": 2}, 2),
}


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(2)
    model, tok = load_model_and_tokenizer("fixture", device="cpu")
    tok.chat_template = CHAT_TEMPLATE
    pipe = hf_pipeline("text-generation", model=model, tokenizer=tok)
    stock = {name: pipe(inputs, **kw) for name, (inputs, kw, _) in CASES.items()}
    return model, pipe, stock


class _CountGenerate:
    """Wraps the accelerated model.generate to count calls and rows (put back before restore())."""

    def __init__(self, model) -> None:
        self.model, self.inner, self.rows = model, model.generate, []

    def __enter__(self):
        def generate(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.rows.append(None if ids is None else ids.shape[0])
            return self.inner(*args, **kwargs)

        self.model.generate = generate
        return self

    def __exit__(self, *exc) -> None:
        self.model.generate = self.inner


@pytest.mark.parametrize("name", list(CASES))
def test_accelerated_pipeline_matches_stock(setup, name):
    model, pipe, stock = setup
    inputs, kwargs, max_calls = CASES[name]
    hf_turbo.accelerate(model, num_blocks=64)
    try:
        with _CountGenerate(model) as count:
            out = pipe(inputs, **kwargs)
        engine = hf_turbo.get_engine(model)
        assert engine.pool.num_free == engine.pool.num_blocks
    finally:
        hf_turbo.restore(model)
    assert out == stock[name]
    assert len(count.rows) == max_calls
    if isinstance(inputs, list) and max_calls == 1:
        assert count.rows == [len(inputs)]  # the whole list in one engine batch


def test_restore_unwraps_the_pipeline_class(setup):
    model, pipe, stock = setup
    gc.collect()
    others = len(turbo_pipeline._accelerated_models)  # accelerated models of other test modules may live on
    hf_turbo.accelerate(model, num_blocks=64)
    assert TextGenerationPipeline.__dict__["get_iterator"] is turbo_pipeline._get_iterator
    assert turbo_pipeline.is_installed()
    hf_turbo.restore(model)
    assert ("get_iterator" in TextGenerationPipeline.__dict__) == turbo_pipeline.is_installed() == (others > 0)
    assert pipe(PROMPTS[:2], **GREEDY) == stock["strings"][:2]  # stock path again


def test_other_models_pass_through(setup):
    model, _, stock = setup
    other, tok = load_model_and_tokenizer("fixture", device="cpu")
    plain = hf_pipeline("text-generation", model=other, tokenizer=tok)
    hf_turbo.accelerate(model, num_blocks=64)
    try:
        with _CountGenerate(other) as count:
            out = plain(PROMPTS[:2], **GREEDY)
        assert count.rows == [1, 1]  # stock: one generate per input (batch_size=1)
        assert out == stock["strings"][:2]
    finally:
        hf_turbo.restore(model)


def test_hf_turbo_pipeline_convenience():
    pipe = hf_turbo.pipeline("text-generation", model="fixture", device="cpu")
    try:
        assert hf_turbo.is_accelerated(pipe.model)
        out = pipe(PROMPTS[:2], max_new_tokens=4, do_sample=False, return_full_text=False)
        assert [len(o) for o in out] == [1, 1] and all(isinstance(o[0]["generated_text"], str) for o in out)
    finally:
        hf_turbo.restore(pipe.model)
    with pytest.raises(ValueError, match="task"):
        hf_turbo.pipeline("summarization", model="fixture")
    with pytest.raises(ValueError, match="model"):
        hf_turbo.pipeline("text-generation")
