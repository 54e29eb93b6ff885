"""The sampler inside the Engine: a seeded request's tokens never depend on the batch, preemption or
speculation; a per-request logits hook runs where transformers runs extra processors."""

from __future__ import annotations

import functools

import torch

import hf_turbo
from hf_turbo import Engine, SamplingParams, TurboConfig
from hf_turbo.engine.spec import SpeculativeConfig
from hf_turbo.testing import tiny_model


@functools.cache
def _model():
    return tiny_model("llama", seed=0, vocab_size=512)


def _run(prompts, params, spec=None, **overrides):
    model = _model()
    engine = Engine(model, config=TurboConfig(debug_checks=True, speculative=spec).replace(
        **{"num_blocks": 256, **overrides}))
    try:
        outs = engine.generate(prompts, params, use_tqdm=False)
        assert engine.pool.num_free == engine.pool.num_blocks
        return [o.token_ids for o in outs], engine.stats()
    finally:
        engine.close()


def test_seeded_request_alone_in_a_batch_of_32_under_preemption_and_speculation():
    g = torch.Generator().manual_seed(0)
    phrase = torch.randint(3, 500, (6,), generator=g).tolist()
    target = phrase * 3  # repeats: prompt lookup finds proposals
    mine = SamplingParams(max_new_tokens=14, temperature=0.9, top_k=40, top_p=0.9, min_p=0.01, seed=1234,
                          repetition_penalty=1.1, presence_penalty=0.3, frequency_penalty=0.2,
                          logit_bias={int(phrase[0]): 1.5})
    others = [torch.randint(3, 500, (int(torch.randint(4, 30, (1,), generator=g)),), generator=g).tolist()
              for _ in range(31)]
    kinds = [dict(), dict(temperature=1.0), dict(temperature=0.7, top_p=0.8), dict(temperature=1.2, top_k=5)]
    other_params = [SamplingParams(max_new_tokens=12, seed=i, **kinds[i % 4]) for i in range(31)]
    prompts = others[:17] + [target] + others[17:]
    params = other_params[:17] + [mine] + other_params[17:]
    try:
        alone, _ = _run([target], [mine])
        batched, _ = _run(prompts, params)
        tight, stats = _run(prompts, params, num_blocks=40, block_size=4, max_num_batched_tokens=96)
        assert stats["preemptions"] > 0
        ngram, ngram_stats = _run(prompts, params, SpeculativeConfig("ngram", num_tokens=3, adaptive=False,
                                                                     max_batch_for_spec=64))
        draft, draft_stats = _run([target] * 2, [mine] * 2,
                                  SpeculativeConfig("draft", draft_model=_model(), num_tokens=3, adaptive=False))
        assert ngram_stats["spec_verify_steps"] > 0 and draft_stats["spec_accepted"] > 0
    finally:
        hf_turbo.restore(_model())
    assert len(set(alone[0])) > 3  # it really sampled
    assert alone[0] == batched[17] == tight[17] == ngram[17] == draft[0] == draft[1]
    assert batched == tight == ngram  # every other request too


def test_logits_hook_runs_per_row_before_the_warpers():
    """A hook banning the token greedy decoding would pick equals stock generate() with suppress_tokens."""
    model = _model()
    prompt = [5, 17, 99, 3, 250, 8]
    stock = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    banned = stock[0]
    want = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                          suppress_tokens=[banned])[0, 6:].tolist()
    seen = []

    def hook(scores: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(scores.shape))
        return scores.index_fill(1, torch.tensor([banned]), -float("inf"))

    try:
        engine = Engine(model, num_blocks=64)
        rid = engine.add_request(prompt, SamplingParams(max_new_tokens=8, min_new_tokens=8), logits_hook=hook)
        other = engine.add_request(prompt, SamplingParams(max_new_tokens=8, min_new_tokens=8))
        outs = {}
        while engine.has_unfinished():
            outs.update({o.request_id: o for o in engine.step() if o.finished})
        # sampled rows see the hook before temperature: the banned token is never drawn
        ids = [engine.add_request(prompt, SamplingParams(max_new_tokens=8, temperature=1.5, seed=s),
                                  logits_hook=hook) for s in range(4)]
        hooked = {}
        while engine.has_unfinished():
            hooked.update({o.request_id: o for o in engine.step() if o.finished})
    finally:
        hf_turbo.restore(model)
    assert banned not in want and outs[rid].token_ids == want
    assert outs[other].token_ids == stock  # the hook is per request
    assert set(seen) == {(1, 512)} and len(seen) == 8 + 4 * 8
    assert all(banned not in hooked[i].token_ids for i in ids)
