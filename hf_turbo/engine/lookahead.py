"""Async scheduling: the host schedules and launches step N+1 while the device still runs step N.

A step whose tokens are sampled on the device without a host sync (a decode step by the graph sampler,
``engine/graph_sampler.py``; any other step whose sampled rows need no host-side processing by the same static
sampler on its eager logits) is kept *in flight*:
its tokens are copied to the host without a wait (pinned buffer, non-blocking copy, an event), and its
requests' progress is committed at once (the step is computing the K/V of each one's last token). On the next
:meth:`Lookahead.launch`, before waiting for those tokens, the next step is scheduled and queued:

- each request that continues gets a placeholder token (``PENDING``), so the scheduler, the block tables, the
  positions and the sampler's seed x position keys see the token it is about to have; a request whose pending
  token is its last (``max_new_tokens``) is left out;
- the input ids of those rows are gathered on the device from step N's sampled tokens (``DecodeGraphs.run`` or
  ``ModelRunner.execute`` with ``ids_from``), stream-ordered after step N's sampler and before step N+1's
  forward; rows that are not step N's (an admitted prompt, a prefill chunk) bring their ids from the host.

Only then does the host wait for step N's tokens: they replace the placeholders, the finish rules run, and
step N's outputs are returned. The tokens are the ones the synchronous loop gives, because every row's inputs,
positions and sampling keys are the same; what differs is work that is thrown away: a request that finishes
in step N by EOS, a stop id, a stop string or the caller's rule has computed one more position in step N+1,
which is discarded (its blocks go back to the pool at once: only work queued later can be given them, and
the device runs that after step N+1). An abort between steps is immediate for the same reason, and the
in-flight step's row for it is skipped. A step N+1 is committed only once step N's tokens are known (the
prefix cache hashes no placeholder).

The next step is always scheduled ahead (admissions included: a request that finishes in step N still holds its
blocks and its place in that schedule). When one of its sampled rows needs the host's sampler (penalties,
logprobs, a grammar, ``generate()``'s processors), its rows run as planned once step N's tokens are known, less
those that finished, and it is not kept in flight. Speculation and tensor parallelism turn it off
(``TurboConfig.async_scheduling``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from hf_turbo.engine.bookkeeping import StepPlan, plan_step
from hf_turbo.engine.graph_sampler import GraphSampled, sample_in_graph, sample_static_eager, static_sampling
from hf_turbo.engine.request import Request, RequestOutput, RequestStatus
from hf_turbo.engine.scheduler import SchedulerOutput

__all__ = ["PENDING", "InFlight", "Lookahead", "Launch", "lookahead_for"]

logger = logging.getLogger(__name__)

PENDING = -1  # the placeholder of a token sampled on the device and not yet on the host


@dataclass
class InFlight:
    """A step whose sampled tokens are on their way to the host (``host`` is valid once ``event`` is done)."""

    plan: StepPlan
    tokens: torch.Tensor
    host: torch.Tensor
    event: torch.cuda.Event | None

    @classmethod
    def detach(cls, plan: StepPlan, sampled: GraphSampled) -> InFlight:
        """Queue the copy of ``sampled``'s tokens to the host (on CUDA, before anything can overwrite them)."""
        tokens = sampled.tokens
        if not tokens.is_cuda:
            return cls(plan, tokens, tokens.clone(), None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(plan, tokens, host, event)

    def wait(self) -> list[int]:
        """The tokens on the host (the step's one wait for the device)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


@dataclass
class Launch:
    """What :meth:`Lookahead.launch` queued, for :meth:`Lookahead.finish`: outputs already known (``done``),
    the older step whose tokens are awaited (``resolve``), the step launched ahead of it (``ahead``) or a step
    launched the usual way (``step``: ``(plan, logits or GraphSampled)``)."""

    done: list[RequestOutput] = field(default_factory=list)
    resolve: InFlight | None = None
    ahead: InFlight | None = None
    step: tuple | None = None


def _running(scheduled: list[tuple[Request, int]]) -> list[tuple[Request, int]]:
    """The scheduled rows whose requests still run (not finished, aborted or preempted since)."""
    return [(req, n) for req, n in scheduled if req.status is RequestStatus.RUNNING]


def _samples_again(req: Request) -> bool:
    """Whether the token ``req`` has in flight is not its last (``max_new_tokens``)."""
    return req.num_output_tokens + 1 < req.params.max_new_tokens


def lookahead_for(engine) -> Lookahead | None:
    """``TurboConfig.async_scheduling`` resolved for ``engine``: None (the default) is on where decode steps
    run as CUDA graphs; True where it cannot run (speculation, tensor parallelism) is a ValueError."""
    wanted = engine.config.async_scheduling
    why = "speculative decoding is on" if engine.spec is not None else \
        "the model is tensor-parallel" if engine.tp is not None else None
    if wanted is False or (wanted is None and (why is not None or engine.runner.graphs is None)):
        return None
    if why is not None:
        raise ValueError(f"TurboConfig.async_scheduling=True cannot be honoured: {why}")
    return Lookahead(engine)


class Lookahead:
    """The engine's steps with step N+1 queued before step N's tokens are waited for (see the module doc)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.inflight: InFlight | None = None
        self.num_ahead = 0  # steps launched before the previous step's tokens were on the host
        self.num_waits = 0  # in-flight steps waited for before the next step could be scheduled

    def launch(self) -> Launch:
        """Queue the next step: ahead of the in-flight one when it can, else after waiting for it."""
        cur, self.inflight = self.inflight, None
        if cur is None:
            return Launch(step=self._launch_plain())
        planned = self._plan_ahead(cur)
        if planned is None:
            self.num_waits += 1
            return Launch(done=self._resolve(cur), step=self._launch_plain())
        plan, rows, pending = planned
        try:
            sampled = self._run_ahead(plan, cur, rows)
        except BaseException:
            self._unpend(pending)
            self._resolve(cur)  # the rows of the failed forward were aborted; the others get their tokens
            raise
        if sampled is not None:
            self.num_ahead += 1
            return Launch(resolve=cur, ahead=InFlight.detach(plan, sampled))
        # a row needs the host's sampler (penalties, logprobs, a grammar, ...): the planned rows run once step N's
        # tokens are known
        self.num_waits += 1
        done = self._resolve(cur)
        live = _running(plan.sched.scheduled)
        return Launch(done=done, step=self._launch_plain(plan_step(SchedulerOutput(live))) if live else None)

    def finish(self, launch: Launch) -> list[RequestOutput]:
        """Wait for the older step's tokens and apply them; keep the newer step in flight."""
        eng = self.engine
        try:
            outputs = launch.done if launch.resolve is None else self._resolve(launch.resolve)
        except BaseException:  # every row got its token (see _resolve): the step queued ahead stays in flight
            if launch.ahead is not None:
                self._keep(launch.ahead)
            raise
        if launch.ahead is not None:
            self._keep(launch.ahead)
        elif launch.step is not None:
            plan, out = launch.step
            if isinstance(out, GraphSampled) and self._continues(plan):
                self._keep(InFlight.detach(plan, out))
            else:
                outputs = outputs + eng.postprocess(plan, out)
        return outputs

    # -- the steps ------------------------------------------------------------------------------
    def _keep(self, step: InFlight) -> None:
        """Commit ``step``'s rows that still run (their K/V is being written) and keep it in flight."""
        live = _running(step.plan.sched.scheduled)
        self.engine.scheduler.commit(SchedulerOutput(live))
        self.inflight = step if live else None

    def _continues(self, plan: StepPlan) -> bool:
        """Whether a step may stay in flight: some row samples past it."""
        return any(_samples_again(req) for _, req in plan.sampled)

    def _plan_ahead(self, cur: InFlight) -> tuple[StepPlan, list[int], list[Request]] | None:
        """Schedule the step after ``cur`` before its tokens are known: (plan, each scheduled row's row in
        ``cur``'s tokens (-1: a row that is not one of them), the requests given a placeholder), or None when no
        row of ``cur`` samples again."""
        sched = self.engine.scheduler
        rows = [req for _, req in cur.plan.sampled]
        live = [req for req in rows if req.status is RequestStatus.RUNNING]
        pending = [req for req in live if _samples_again(req)]
        if not pending:
            return None
        for req in pending:
            req.token_ids.append(PENDING)
        out = sched.schedule(skip={req for req in live if req.token_ids[-1] != PENDING})
        if not out.scheduled:
            self._unpend(pending)
            for req in pending:
                if req.status is RequestStatus.RUNNING:
                    sched.trim(req)
            return None
        index = {id(req): j for j, req in enumerate(rows)}
        return plan_step(out), [index.get(id(req), -1) for req, _ in out.scheduled], pending

    def _launch_plain(self, plan: StepPlan | None = None) -> tuple | None:
        """``Engine.launch_plain``, its logits sampled on the device when the static sampler can take its rows."""
        step = self.engine.launch_plain(plan)
        if step is None or isinstance(step[1], GraphSampled):
            return step
        sampled = sample_static_eager(self.engine, *step)
        return step if sampled is None else (step[0], sampled)

    def _run_ahead(self, plan: StepPlan, cur: InFlight, rows: list[int]) -> GraphSampled | None:
        """Queue ``plan`` with its pending rows' ids taken from ``cur``'s tokens: a plain decode step as the
        decode graphs and their sampler, any other the eager forward and the static sampler; None (nothing ran)
        where a row needs the host's sampler."""
        eng = self.engine
        ids_from = (cur.tokens, rows)
        try:
            sampled = None if -1 in rows else sample_in_graph(eng, plan, ids_from)
            how = None if sampled is not None else static_sampling(eng, plan)
            if how is not None:
                logits = eng.runner.execute(plan.sched.scheduled, plan.rows, ids_from)
                sampled = sample_static_eager(eng, plan, logits, how)
        except Exception as exc:
            eng.book.fail(plan.sched.scheduled, exc)
            raise
        if sampled is not None:
            eng.num_steps += 1
        return sampled

    @staticmethod
    def _unpend(reqs: list[Request]) -> None:
        for req in reqs:
            if req.token_ids and req.token_ids[-1] == PENDING:
                req.token_ids.pop()

    def _resolve(self, step: InFlight) -> list[RequestOutput]:
        """Wait for ``step``'s tokens, put them in place of the placeholders, apply the finish rules.

        The step's progress is committed, so every row must get its token: an interrupt during the wait waits
        again and applies them before it propagates, and a caller's rule raising for one row (``stop_checker``,
        ``on_finish``) is raised once the other rows have theirs."""
        try:
            tokens = step.wait()
        except BaseException:
            self._apply(step, step.wait())
            raise
        return self._apply(step, tokens)

    def _apply(self, step: InFlight, tokens: list[int]) -> list[RequestOutput]:
        book = self.engine.book
        now = time.perf_counter()
        outputs, error = [], None
        for j, (_, req) in enumerate(step.plan.sampled):
            if req.is_finished:  # aborted (or failed) while the step ran
                continue
            if req.token_ids[-1] == PENDING:
                req.token_ids.pop()
            try:
                book.append(req, [tokens[j]], j, None, None, {}, now)
                if req.finish_reason is not None:
                    book.forget(req, RequestStatus.FINISHED)
                outputs.append(req.to_output(book.detok(req) if req.finish_reason else None))
            except Exception as exc:  # noqa: BLE001 - raised below, once every row has its token
                error = error or exc
        if error is not None:
            raise error
        return outputs
