"""Quantized weights on the lean forward (issue 23, item 2): models loaded through transformers' quantizers
(bitsandbytes 8/4-bit, torchao int8 weight-only) run on the engine's lean forward with stock generate()'s
tokens on the same quantized model, and accelerate() names the path in one log line."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TorchAoConfig  # noqa: E402

import hf_turbo  # noqa: E402
from hf_turbo.backends.base import is_plain_linear  # noqa: E402
from hf_turbo.testing import tiny_model  # noqa: E402

PROMPTS = [[5, 17, 3, 99, 42, 7, 250, 11, 60], [300, 2, 8], [77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89]]


def _quantizers():
    from torchao.quantization import Int8WeightOnlyConfig

    return {
        "bnb_4bit": (BitsAndBytesConfig(load_in_4bit=True), "bitsandbytes Linear4bit"),
        # LLM.int8() without its outlier decomposition: each row's product depends on that row only
        "bnb_8bit_no_outliers": (BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0),
                                 "bitsandbytes Linear8bitLt"),
        "torchao_int8_weight_only": (TorchAoConfig(Int8WeightOnlyConfig()), "nn.Linear over Int8Tensor"),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    paths = {}
    for model_type in ("llama", "qwen3"):
        path = tmp_path_factory.mktemp(model_type)
        tiny_model(model_type).save_pretrained(path)
        paths[model_type] = path
    return paths


def _load(path, quantization_config):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization_config, device_map="cpu").eval()


def _stock(model, max_new_tokens=12):
    return [model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False)[0, len(p):].tolist()
            for p in PROMPTS]


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("name", ["bnb_4bit", "bnb_8bit_no_outliers", "torchao_int8_weight_only"])
def test_quantized_model_runs_lean_with_stock_tokens(saved, model_type, name, caplog):
    quantization_config, kind = _quantizers()[name]
    model = _load(saved[model_type], quantization_config)
    assert any(not is_plain_linear(m) for m in model.modules() if isinstance(m, torch.nn.Linear))
    expected = _stock(model)
    with caplog.at_level(logging.INFO, logger="hf_turbo.api"):
        hf_turbo.accelerate(model)
    try:
        line = next(r.getMessage() for r in caplog.records if "accelerated" in r.getMessage())
        assert "the lean forward" in line and kind in line, line
        # one engine batch of all prompts, and each prompt alone
        batch = hf_turbo.get_engine(model).generate(PROMPTS, hf_turbo.SamplingParams(max_new_tokens=12))
        assert [o.token_ids for o in batch] == expected
        assert _stock(model) == expected  # the accelerated generate()
        runner = hf_turbo.get_engine(model).runner
        assert runner.lean is not None and runner.lean_verified, "the lean forward was not used"
        backend = runner.backend
        packed = getattr(backend, "linears", {})
        assert not any(not is_plain_linear(m) for m in packed), "a quantized layer got a packed float copy"
    finally:
        hf_turbo.restore(model)


def test_llm_int8_outlier_decomposition_is_refused_with_the_fix(saved):
    """LLM.int8() with its default outlier threshold picks outlier columns over every row of the batch, so a
    packed batch changes each prompt's logits: the probe refuses it and says how to load it row-independent."""
    model = _load(saved["llama"], BitsAndBytesConfig(load_in_8bit=True))
    with pytest.raises(ValueError, match="llm_int8_threshold=0.0"):
        hf_turbo.accelerate(model)
    assert not hf_turbo.is_accelerated(model)
    assert model.config._attn_implementation != "hf_turbo"


def test_describe_names_the_path():
    from hf_turbo.engine.lean import LeanForward

    model = tiny_model("llama")
    assert LeanForward.describe(model) == "the lean forward (Llama family; linear layers: nn.Linear)"
    model.model.layers[0].mlp.up_proj = torch.nn.Sequential(model.model.layers[0].mlp.up_proj)
    assert LeanForward.describe(model).startswith("the model's own forward (layer 0 has a projection")
