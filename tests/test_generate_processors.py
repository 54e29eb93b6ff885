"""transformers' logits processors in generate() run per row on the engine (bad_words_ids,
remove_invalid_values, no_repeat_ngram_size, suppress_tokens, forced_eos_token_id, a user's
logits_processor list): the same tokens and scores as stock generate(), fp32, greedy."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import hf_turbo
from hf_turbo.eval.exactness import generate_both, masked_batch
from hf_turbo.testing import tiny_model


class _BanTopAfterOdd(LogitsProcessor):
    """A user processor that reads each row's history: where the row's last token is odd, it bans the row's
    current best token."""

    def __call__(self, input_ids, scores):
        odd = (input_ids[:, -1] % 2 == 1)
        best = scores.argmax(-1)
        banned = torch.zeros_like(scores, dtype=torch.bool)
        banned[torch.arange(scores.shape[0]), best] = odd
        return scores.masked_fill(banned, -float("inf"))


# each built from what plain greedy decoding emits (``new`` [B, 8]), so that it changes the output
PROCESSOR_KWARGS = {
    "bad_words_ids": lambda new: {"bad_words_ids": [[int(new[0, 1])], [int(new[1, 2]), int(new[1, 3])]]},
    "remove_invalid_values": lambda new: {"remove_invalid_values": True, "min_new_tokens": 3,
                                          "eos_token_id": int(new[2, 1])},
    "no_repeat_ngram_size": lambda new: {"no_repeat_ngram_size": 1},
    "suppress_tokens": lambda new: {"suppress_tokens": sorted({int(t) for t in new[:, :2].flatten()})},
    "forced_eos_token_id": lambda new: {"forced_eos_token_id": 9, "max_new_tokens": 5},
    "logits_processor": lambda new: {"logits_processor": LogitsProcessorList([_BanTopAfterOdd()])},
}


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("name", sorted(PROCESSOR_KWARGS))
def test_transformers_processors_run_per_row_on_the_engine(arch, name):
    model = tiny_model(arch)
    ids, mask = masked_batch(model.config.vocab_size, seed=3)
    base = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    plain = model.generate(**base)
    kw = {**base, **PROCESSOR_KWARGS[name](plain[:, ids.shape[1]:])}
    stock, fast, fallbacks = generate_both(model, **kw)
    assert not fallbacks
    assert torch.equal(stock, fast)
    if name != "remove_invalid_values":  # the processor changed something, so the test can fail
        assert not torch.equal(plain[:, :stock.shape[1]], stock)


def test_processor_scores_and_sampling_keep_stocks_shapes():
    model = tiny_model("llama")
    ids, mask = masked_batch(model.config.vocab_size, seed=4)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
              bad_words_ids=[[9]], return_dict_in_generate=True, output_scores=True)
    stock, fast, fallbacks = generate_both(model, **kw)
    assert not fallbacks and torch.equal(stock.sequences, fast.sequences)
    for s, f in zip(stock.scores, fast.scores):
        assert torch.isinf(f[:, 9]).all()
        torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-5)
    # sampling with a processor runs on the engine too and never draws a banned word
    hf_turbo.accelerate(model)
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=True,
                             temperature=1.5, pad_token_id=0, bad_words_ids=[[t] for t in range(3, 200)])
    finally:
        hf_turbo.restore(model)
    assert not ((out[:, ids.shape[1]:] >= 3) & (out[:, ids.shape[1]:] < 200)).any()


