"""Tiny random-weight decoders: every tested architecture builds from its config, runs, and is seeded."""

from __future__ import annotations

import pytest
import torch

from hf_turbo.testing import TINY_ARCHS, tiny_config, tiny_model

B, T = 3, 16  # T > the sliding window (8), so windowed layers drop keys


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_forward_gives_finite_decisive_logits(arch: str) -> None:
    model = tiny_model(arch)
    assert not model.training
    vocab = model.config.vocab_size
    with torch.no_grad():
        logits = model(_ids(vocab)).logits
    assert logits.shape == (B, T, vocab)
    assert torch.isfinite(logits).all()
    # greedy must not hinge on rounding: the top-2 gap is clear almost everywhere ...
    top2 = logits.topk(2, dim=-1).values
    gap = top2[..., 0] - top2[..., 1]
    assert (gap > 1e-3).float().mean() > 0.9, f"{arch}: top-2 gaps {gap.flatten()[:8]}"
    # ... and different prompts lead to different tokens
    assert len(set(logits[:, -1].argmax(-1).tolist())) > 1


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_same_seed_same_weights(arch: str) -> None:
    rng = torch.random.get_rng_state()
    a, b = tiny_model(arch, seed=7).state_dict(), tiny_model(arch, seed=7).state_dict()
    assert torch.equal(rng, torch.random.get_rng_state()), "tiny_model must not consume the global RNG"
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_other_seed_other_weights() -> None:
    a, c = tiny_model("llama", seed=7).state_dict(), tiny_model("llama", seed=8).state_dict()
    assert all(not torch.equal(a[k], c[k]) for k in a if k.endswith("proj.weight"))


def test_special_token_ids_inside_vocab() -> None:
    for arch in TINY_ARCHS:
        config = tiny_config(arch)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            ids = getattr(config, name, None)
            for i in ids if isinstance(ids, list) else [ids]:
                assert i is None or 0 <= i < config.vocab_size, (arch, name, i)


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3_text", "cohere2"])
def test_sliding_window_is_short_and_mixed_with_full_layers(arch: str) -> None:
    config = tiny_config(arch)
    assert config.sliding_window == 8
    if arch != "mistral":  # mistral slides in every layer
        assert {"sliding_attention", "full_attention"} <= set(config.layer_types)


def test_softcaps_small_enough_to_bind() -> None:
    config = tiny_config("gemma2")
    assert config.attn_logit_softcapping is not None and config.attn_logit_softcapping <= 10
    assert config.final_logit_softcapping is not None
    assert tiny_config("gemma3_text").attn_logit_softcapping is None  # families without caps keep none


@pytest.mark.parametrize("head_dim", [80, 96])
def test_head_dim_override(head_dim: int) -> None:
    model = tiny_model("llama", head_dim=head_dim)
    attn = model.model.layers[0].self_attn
    assert attn.head_dim == head_dim
    assert attn.q_proj.out_features == model.config.num_attention_heads * head_dim
    with torch.no_grad():
        assert torch.isfinite(model(_ids(model.config.vocab_size)).logits).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_odd_head_dim_from_hidden_and_heads(arch: str) -> None:
    config = tiny_config(arch, hidden_size=160, num_attention_heads=2)
    assert (config.hidden_size, config.num_attention_heads) == (160, 2)
    assert config.hidden_size // config.num_attention_heads == 80
    assert getattr(config, "head_dim", 80) == 80


def test_bfloat16_is_the_float32_model_rounded() -> None:
    full, half = tiny_model("qwen3"), tiny_model("qwen3", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half.lm_head.weight, full.lm_head.weight.to(torch.bfloat16))


def test_unknown_model_type_lists_supported() -> None:
    with pytest.raises(ValueError, match="'no-such-model'.*llama"):
        tiny_model("no-such-model")


@pytest.mark.parametrize(("arch", "why"), [("t5", "encoder-decoder"), ("bert", "encoder")])
def test_non_decoder_is_refused(arch: str, why: str) -> None:
    with pytest.raises(ValueError, match=f"'{arch}'.*{why}"):
        tiny_model(arch)
