"""Token bookkeeping (engine/bookkeeping.py): accept, append, finish, free and roll back, on a real scheduler
and block pool with hand-made sampler results (no model)."""

from __future__ import annotations

import torch

from hf_turbo.cache.block_pool import BlockPool
from hf_turbo.engine.bookkeeping import Bookkeeper, logprob_entries, plan_step
from hf_turbo.engine.request import Request, RequestStatus
from hf_turbo.engine.scheduler import Scheduler
from hf_turbo.sampling import SamplingParams
from hf_turbo.sampling.sampler import SampleResult

BS = 4
VOCAB = 11


def make_book(num_blocks: int = 16, accept=None) -> Bookkeeper:
    pool = BlockPool(num_blocks, BS)
    return Bookkeeper(Scheduler(pool, 8, 64), accept=accept, release=(lambda r: None) if accept else None)


def add(book: Bookkeeper, rid: str, prompt: list[int], **params) -> Request:
    req = Request(rid, prompt, SamplingParams(**params), seed=0, eos_ids=(10,))
    book.requests[rid] = req
    book.scheduler.add(req)
    return req


def result(tokens: list[int]) -> tuple[SampleResult, torch.Tensor]:
    logits = torch.randn(len(tokens), VOCAB)
    return SampleResult(torch.tensor(tokens), logits, {}), logits


def test_prefill_then_decode_appends_one_token_each_and_commits_progress():
    book = make_book()
    req = add(book, "a", [1, 2, 3, 4, 5], max_new_tokens=5)
    plan = plan_step(book.scheduler.schedule())
    assert plan.rows == [[4]] and [r for _, r in plan.sampled] == [req]
    outs = book.postprocess(plan, *result([7]))
    assert req.token_ids == [1, 2, 3, 4, 5, 7] and req.num_computed == 5
    assert [o.token_ids for o in outs] == [[7]] and not outs[0].finished
    plan = plan_step(book.scheduler.schedule())
    assert plan.sched.scheduled == [(req, 1)] and plan.rows == [[0]]
    book.postprocess(plan, *result([8]))
    assert req.output_ids == [7, 8] and req.num_computed == 6 and book.num_generated_tokens == 2


def test_chunk_short_of_the_prompt_samples_nothing():
    book = make_book()
    book.scheduler.max_num_batched_tokens = 3
    add(book, "a", [1, 2, 3, 4, 5], max_new_tokens=5)
    plan = plan_step(book.scheduler.schedule())
    assert plan.rows == [[]] and plan.sampled == [] and plan.row_states() == []


def test_eos_finishes_frees_blocks_and_calls_on_finish_while_blocks_are_held():
    book = make_book()
    req = add(book, "a", [1, 2, 3, 4, 5], max_new_tokens=5)
    held = []
    req.on_finish = lambda r: held.append(list(r.block_ids))
    book.postprocess(plan_step(book.scheduler.schedule()), *result([10]))
    assert req.finish_reason == "stop" and req.status is RequestStatus.FINISHED and req.finish_time is not None
    assert held == [[0, 1]] and req.block_ids == []
    assert "a" not in book.requests and book.scheduler.pool.num_free == 16


def test_eos_before_min_new_tokens_and_length_and_stop_checker():
    book = make_book()
    early = add(book, "a", [1, 2, 3], max_new_tokens=2, min_new_tokens=2)
    checked = add(book, "b", [1, 2, 3], max_new_tokens=9)
    checked.stop_checker = lambda out: out[-1] == 6
    book.postprocess(plan_step(book.scheduler.schedule()), *result([10, 5]))
    assert early.finish_reason is None and checked.finish_reason is None
    outs = book.postprocess(plan_step(book.scheduler.schedule()), *result([5, 6]))
    assert early.finish_reason == "length" and checked.finish_reason == "stop"
    assert all(o.finished for o in outs) and book.scheduler.pool.num_free == 16


def test_speculation_keeps_accepted_tokens_and_rolls_back_the_rest():
    accepted = []

    def accept(req, choices):  # the target agreed with the first proposal only: it plus its own next token
        accepted.append(list(choices))
        return choices[:2]

    book = make_book(accept=accept)
    req = add(book, "a", [1, 2, 3, 4, 5], max_new_tokens=9)
    book.postprocess(plan_step(book.scheduler.schedule()), *result([6]))
    req.spec_tokens = [7, 8, 9]
    plan = plan_step(book.scheduler.schedule())
    assert plan.sched.scheduled == [(req, 4)] and plan.rows == [[0, 1, 2, 3]]
    states = plan.row_states()
    assert [s.position for s in states] == [1, 2, 3, 4]
    book.postprocess(plan, *result([7, 3, 9, 2]))
    assert accepted == [[7, 3, 9, 2]]
    # computed: the last sampled token (6) and the accepted proposal (7); 3 is new, its K/V not yet computed
    assert req.output_ids == [6, 7, 3] and req.num_computed == 7 and req.spec_tokens == []
    assert len(req.block_ids) == 2  # the third block only held rejected proposals: trimmed


def test_speculation_stops_at_a_finish_inside_the_accepted_tokens():
    book = make_book(accept=lambda req, choices: choices)
    req = add(book, "a", [1, 2, 3], max_new_tokens=9)
    book.postprocess(plan_step(book.scheduler.schedule()), *result([4]))
    req.spec_tokens = [10, 5]
    book.postprocess(plan_step(book.scheduler.schedule()), *result([10, 5, 6]))
    assert req.output_ids == [4, 10] and req.finish_reason == "stop"
    assert book.num_generated_tokens == 2 and book.scheduler.pool.num_free == 16


def test_fail_and_abort_free_every_block():
    book = make_book()
    a = add(book, "a", [1, 2, 3, 4, 5])
    add(book, "b", [1, 2])
    plan = plan_step(book.scheduler.schedule())
    book.fail(plan.sched.scheduled[:1], RuntimeError("boom"))
    assert a.status is RequestStatus.ABORTED and isinstance(a.error, RuntimeError) and "a" not in book.requests
    out = book.abort("b")
    assert out.finish_reason == "abort" and book.abort("b") is None
    assert book.scheduler.pool.num_free == 16 and not book.requests


def test_logprob_entries_match_log_softmax():
    logits = torch.randn(3, VOCAB)
    got = logprob_entries(logits, [(0, 2), (2, 0)], [4, 1, 7])
    ref = torch.log_softmax(logits, -1)
    assert got[0][4] == ref[0, 4].item() and got[2] == {7: ref[2, 7].item()}
    top = ref[0].topk(2)
    for v, i in zip(top.values.tolist(), top.indices.tolist()):
        assert got[0][i] == v
    assert logprob_entries(logits, [], [0, 0, 0]) == {}
