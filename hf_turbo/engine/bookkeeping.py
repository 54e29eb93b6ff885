"""Token bookkeeping after a forward: the one place where tokens are accepted, appended, checked for a
finish, freed and rolled back.

A step's plan (:class:`StepPlan`) says which requests ran and which logits rows each sampled: a request
whose chunk reaches its end samples its last token and one row per proposal after it. After sampling,
:meth:`Bookkeeper.postprocess` accepts the longest agreeing prefix of each request's proposals (plus the
target's own next token), appends the accepted tokens one by one until a finish rule fires, rolls the
step's computed-token count back past rejected proposals (their K/V is recomputed later), commits the
scheduler (which hashes only accepted tokens into the prefix cache), and frees finished requests.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hf_turbo.engine.request import Request, RequestOutput, RequestStatus
from hf_turbo.engine.scheduler import Scheduler, SchedulerOutput
from hf_turbo.engine.stops import StopStringMatcher, byte_pieces, cut_at_stops
from hf_turbo.sampling import RowState, SampleResult

__all__ = ["Bookkeeper", "StepPlan", "logprob_entries"]


@dataclass
class StepPlan:
    """One step's schedule: ``sched.scheduled`` [(request, new tokens)] and, per scheduled request, the
    offsets within its chunk whose logits are sampled (``rows``; empty for a prefill chunk that does not
    reach the end of its prompt)."""

    sched: SchedulerOutput
    rows: list[list[int]]

    @functools.cached_property
    def sampled(self) -> list[tuple[int, Request]]:
        """(index in the schedule, request) of every request that samples this step."""
        return [(i, req) for i, (req, _) in enumerate(self.sched.scheduled) if self.rows[i]]

    def row_states(self) -> list[RowState]:
        """The sampler's rows in logits order: position p + j of a request sees its proposals before j."""
        return [RowState(req.params, req.num_output_tokens + j, req.seed,
                         req.token_ids + req.spec_tokens[:j] if req.params.needs_history else None, req.eos_ids,
                         req.logits_hook)
                for i, req in self.sampled for j in range(len(self.rows[i]))]


def plan_step(sched: SchedulerOutput) -> StepPlan:
    """The logits rows of a schedule: a request whose chunk reaches its end (proposals included) samples its
    last token and each proposal after it."""
    rows = [list(range(n - 1 - len(req.spec_tokens), n))
            if req.num_computed + n == req.num_tokens + len(req.spec_tokens) else []
            for req, n in sched.scheduled]
    return StepPlan(sched, rows)


def logprob_entries(logits: torch.Tensor, asks: list[tuple[int, int]],
                    tokens: list[int]) -> dict[int, dict[int, float]]:
    """Per asking row ``(row, n)``: the sampled token's log-probability and the ``n`` most likely tokens', from
    the raw logits; all rows' figures reach the host in one copy."""
    if not asks:
        return {}
    idx = torch.tensor([r for r, _ in asks], device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
    chosen = logp.gather(1, torch.tensor([[tokens[r]] for r, _ in asks], device=logits.device))
    width = max(n for _, n in asks)
    top = torch.topk(logp, min(width, logp.shape[-1]), dim=-1) if width else None
    parts = [chosen.double()] + ([top.values.double(), top.indices.double()] if top is not None else [])
    host = torch.cat(parts, dim=1).tolist()  # indices < 2**53: exact in float64
    out = {}
    for (row, n), vals in zip(asks, host):
        entry = {tokens[row]: vals[0]}
        entry.update(zip((int(t) for t in vals[1 + width:1 + width + n]), vals[1:1 + n]))
        out[row] = entry
    return out


class Bookkeeper:
    """Appends sampled tokens to requests, applies the finish rules (stop strings, EOS and stop ids, the
    caller's stop rule, length), keeps the KV of accepted tokens only, and frees what finished.

    ``accept(request, choices) -> tokens`` is the speculative decoder's acceptance (None without
    speculation); ``release(request)`` drops its speculation state.
    """

    def __init__(self, scheduler: Scheduler, tokenizer=None, accept: Callable | None = None,
                 release: Callable[[Request], None] | None = None) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.accept = accept
        self.release = release
        self.requests: dict[str, Request] = {}
        self.num_generated_tokens = 0

    def postprocess(self, plan: StepPlan, result: SampleResult, logits: torch.Tensor) -> list[RequestOutput]:
        """Apply one step's sampled tokens; returns the outputs of requests that got tokens or finished."""
        sched, sampled = plan.sched, plan.sampled
        tokens = result.tokens.tolist()
        row_reqs = [req for i, req in sampled for _ in plan.rows[i]]
        logp = logprob_entries(logits, [(r, req.params.logprobs) for r, req in enumerate(row_reqs)
                                        if req.params.logprobs is not None], tokens)
        now = time.perf_counter()
        row = 0
        for i, req in sampled:
            k = len(req.spec_tokens)
            choices = tokens[row:row + k + 1]
            emit = self.accept(req, choices) if k else choices
            kept = self.append(req, emit, row, logits, result, logp, now)
            # roll back: keep the KV of the accepted tokens only; rejected proposals are recomputed later
            n = sched.scheduled[i][1]
            sched.scheduled[i] = (req, n - k + min(len(emit) - 1, kept))
            req.spec_tokens.clear()
            row += k + 1
        self.scheduler.commit(sched)  # hashes only accepted tokens into the prefix cache
        outputs = []
        for _, req in sampled:
            if req.finish_reason is not None:
                self.forget(req, RequestStatus.FINISHED)
            elif self.accept is not None:
                self.scheduler.trim(req)
            outputs.append(req.to_output(self.detok(req) if req.finish_reason else None))
        return outputs

    def append(self, req: Request, tokens: list[int], row: int, logits: torch.Tensor, result: SampleResult,
               logp: dict[int, dict[int, float]], now: float) -> int:
        """Append ``tokens`` (``logits`` rows from ``row`` on) one by one, stopping at the first finish;
        returns how many were appended."""
        for j, tok in enumerate(tokens):
            r = row + j
            req.token_ids.append(tok)
            self.num_generated_tokens += 1
            if req.scores is not None:
                req.scores.append(result.scores(r).clone())
                req.raw_logits.append(logits[r].clone())
            if req.first_token_time is None:
                req.first_token_time = now
            if req.params.logprobs is not None:
                req.logprobs.append(logp[r])
            # a token outside the grammar comes only from a row with every token masked: end the output
            reason = "stop" if req.grammar is not None and not req.grammar.accept(tok) else self.check_finish(req, tok)
            if reason is not None:
                req.finish_reason = reason
                req.finish_time = now
                return j + 1
        return len(tokens)

    def check_finish(self, req: Request, tok: int) -> str | None:
        """The finish reason the newest token ``tok`` gives, if any."""
        # stop strings first: the matcher sees every token, so the final text includes this one
        p = req.params
        n = req.num_output_tokens
        if p.stop and self.tokenizer is not None and self._stop_matcher(req).push(tok):
            return "stop"
        if n >= p.min_new_tokens and (tok in req.eos_ids or tok in p.stop_token_ids):
            return "stop"
        if req.stop_checker is not None and req.stop_checker(req.output_ids):
            return "stop"
        if n >= p.max_new_tokens:
            return "length"
        return None

    def fail(self, scheduled: list[tuple[Request, int]], exc: BaseException) -> None:
        """A step's forward raised: abort its requests (the engine keeps serving the rest)."""
        for req, _ in scheduled:
            req.error = exc
            req.finish_reason = "abort"
            self.forget(req, RequestStatus.ABORTED)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; its output has finish_reason 'abort'."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        req.finish_reason = "abort"
        req.finish_time = time.perf_counter()
        self.forget(req, RequestStatus.ABORTED)
        return req.to_output(self.detok(req))

    def forget(self, req: Request, status: RequestStatus) -> None:
        """Drop a finished or failed request: its blocks, its id, its speculation state."""
        if status is RequestStatus.FINISHED and req.on_finish is not None:
            req.on_finish(req)
        self.requests.pop(req.request_id, None)
        self.scheduler.finish(req, status)
        if self.release is not None:
            self.release(req)

    @functools.cached_property
    def _stop_pieces(self) -> list[bytes] | None:
        return byte_pieces(self.tokenizer)

    def _stop_matcher(self, req: Request) -> StopStringMatcher:
        """The request's stop-string matcher (built on its first token; the tokenizer's pieces once)."""
        if req.stop_matcher is None:
            req.stop_matcher = StopStringMatcher(self.tokenizer, req.params.stop, self._stop_pieces)
            for t in req.output_ids[:-1]:  # none normally: built when the first output token arrives
                req.stop_matcher.push(t)
        return req.stop_matcher

    def detok(self, req: Request) -> str | None:
        """The request's output text (cut at its first stop string), or None without a tokenizer."""
        if self.tokenizer is None:
            return None
        m = req.stop_matcher
        if m is not None and len(m.ids) == req.num_output_tokens:
            return m.final_text()
        return cut_at_stops(self.tokenizer.decode(req.output_ids, skip_special_tokens=True), req.params.stop)
