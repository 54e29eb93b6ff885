"""The loop of every rank but 0 in a tensor-parallel group: replay rank 0's plans, forward for forward.

A follower's :class:`~hf_turbo.engine.Engine` has the same pools, runner and CPU mirrors as rank 0's
but never schedules: each plan (``engine/distributed.py``) names the requests of one forward; the
follower keeps a shadow of each (token ids, blocks, computed count, proposals), runs the same
``runner.execute`` on them, and drops the shadows whose blocks rank 0 released. Its logits are thrown
away, unless ``check_sampling``: then it samples its rows from the broadcast seeds and counts how often
its tokens are rank 0's (keyed sampling makes them equal wherever the logits are).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from hf_turbo.engine.distributed import RUN_END, STEP, STOP, TPGroup, _FollowerRunner, attach, model_tp_size
from hf_turbo.sampling import RowState, sample

logger = logging.getLogger(__name__)

__all__ = ["Follower", "follow", "tensor_parallel"]


@dataclass(eq=False)
class _Shadow:
    """What the runner and the CPU mirror read of a request, as rank 0's plans describe it."""

    request_id: str
    prompt_len: int
    token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    spec_tokens: list[int] = field(default_factory=list)
    model_inputs: dict | None = None
    sampling: dict | None = None  # params, seed, eos_ids, hooked (check_sampling only)
    expected: tuple[int, list[int]] | None = None  # (token count when sampled, this rank's choices)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len


@dataclass
class FollowStats:
    """What a follower did: forwards run, failed, and (``check_sampling``) tokens compared with rank 0's."""

    steps: int = 0
    failed_steps: int = 0
    tokens_checked: int = 0
    tokens_mismatched: int = 0


class Follower:
    """Replays rank 0's plans on ``engine``'s runner and cache (see the module docstring)."""

    def __init__(self, engine, group: TPGroup, check_sampling: bool | None = None) -> None:
        if group.is_driver:
            raise RuntimeError("rank 0 drives the group; Follower is for the other ranks")
        group.check_same("num_blocks", engine.pool.num_blocks)
        self.engine = engine
        self.runner = engine.runner  # the real one: tensor_parallel() leaves the engine a runner that refuses steps
        self.group = group
        self.check_sampling = engine.config.debug_checks if check_sampling is None else check_sampling
        self.shadows: dict[str, _Shadow] = {}
        self.stats = FollowStats()
        self.run_end: tuple | None = None  # (outputs, error) of rank 0's latest run_to_completion
        self.stopped = False  # rank 0 closed the group

    def run(self) -> FollowStats:
        """Follow until rank 0 closes the group (its ``close()``); returns the counts."""
        while not self.stopped:
            self._next()
        for shadow in self.shadows.values():
            self.engine.backend.release(self.engine.cache, shadow)
        self.shadows.clear()
        return self.stats

    def _next(self) -> str:
        """Receive and apply one message; returns its kind (the outcome of a run is kept in ``run_end``)."""
        message = self.group.recv()
        kind = message[0]
        if kind == STEP:
            self.step(*message[1:])
        elif kind == RUN_END:
            self.run_end = message[1:]
        elif kind == STOP:
            self.stopped = True
        else:
            raise RuntimeError(f"unknown tensor-parallel message {kind!r}")
        return kind

    def run_to_completion(self, run, request_ids, on_output=None) -> list:
        """A follower's ``Engine.run_to_completion``: its own requests never run (only rank 0 schedules, the
        same calls made it queue the same ones); follow rank 0 until its run ends and return its outputs."""
        for rid in request_ids:
            self.engine.abort(rid)  # never scheduled here: nothing to free but the entry
        while True:
            kind = self._next()
            if kind == STOP:
                raise RuntimeError("rank 0 closed the tensor-parallel group during a run")
            if kind == RUN_END:
                break
        outputs, error = self.run_end
        if error is not None:
            raise RuntimeError(f"rank 0's run failed: {error}")
        if len(outputs) != len(request_ids):
            raise RuntimeError(f"rank 0 ran {len(outputs)} requests where this rank queued {len(request_ids)}: "
                               "every rank must make the same calls")
        outputs = [dataclasses.replace(o, request_id=rid) for o, rid in zip(outputs, request_ids)]
        for out in outputs:
            if on_output is not None:
                on_output(out)
        return outputs

    def close(self) -> None:
        """The follower's ``Engine.close``: wait for rank 0's own ``close`` (a script that makes the same calls on
        every rank closes every rank's engine), unless the group was closed already."""
        while not self.stopped:
            self._next()

    def step(self, released: list, copies: list, entries: list, rows: list[list[int]] | None) -> None:
        """One plan: drop the released shadows, copy the copied blocks, update the scheduled ones, run the forward."""
        engine = self.engine
        drop = lambda shadow: engine.backend.release(engine.cache, shadow)  # noqa: E731
        for rid, start, tail in released:
            shadow = self.shadows.pop(rid, None)
            if shadow is not None:
                self._check(shadow, start, tail)
                drop(shadow)
        for src, dst in copies:
            self.engine.cache.copy_block(src, dst)
        scheduled = []
        for rid, num_computed, n, start, tail, block_ids, spec, first in entries:
            shadow = self.shadows.get(rid)
            if shadow is None:
                if first is None:
                    raise RuntimeError(f"plan schedules {rid!r} without introducing it")
                shadow = self.shadows[rid] = _Shadow(rid, first["prompt_len"], model_inputs=first["model_inputs"],
                                                     sampling=first if "params" in first else None)
            self._check(shadow, start, tail)
            del shadow.token_ids[start:]
            shadow.token_ids.extend(tail)
            shadow.num_computed = num_computed
            shadow.block_ids = block_ids
            shadow.spec_tokens = spec
            scheduled.append((shadow, n))
        try:
            logits = self.runner.execute(scheduled, rows)
        except Exception:  # rank 0 ran the same forward: it fails these requests and sends the next plan
            self.stats.failed_steps += 1
            logger.exception("tensor-parallel follower: a forward failed")
            return
        self.stats.steps += 1
        if self.check_sampling and rows is not None:
            self._sample(scheduled, rows, logits)

    def _sample(self, scheduled: list, rows: list[list[int]], logits: torch.Tensor) -> None:
        """This rank's own choice at every sampled row, kept until rank 0's tokens arrive."""
        picks = [(shadow, len(rows[i])) for i, (shadow, _) in enumerate(scheduled) if rows[i]]
        states = [RowState(s.sampling["params"], s.num_output_tokens + j, s.sampling["seed"],
                           s.token_ids + s.spec_tokens[:j] if s.sampling["params"].needs_history else None,
                           s.sampling["eos_ids"]) if s.sampling is not None else None
                  for s, k in picks for j in range(k)]
        keep = [i for i, st in enumerate(states) if st is not None]
        if not keep:
            return
        tokens = sample(logits[keep], [states[i] for i in keep]).tolist()
        chosen = dict(zip(keep, tokens))
        row = 0
        for shadow, k in picks:
            if shadow.sampling is not None and not shadow.sampling["hooked"]:
                shadow.expected = (shadow.num_tokens, [chosen[r] for r in range(row, row + k)])
            row += k

    def _check(self, shadow: _Shadow, start: int, tail: list[int]) -> None:
        """Rank 0's tokens after a sampled step must be a prefix of this rank's choices there."""
        expected, shadow.expected = shadow.expected, None
        if expected is None:
            return
        at, choices = expected
        got = tail[at - start:] if start <= at else []
        if not got:  # the step failed or was cut short: nothing to compare
            return
        self.stats.tokens_checked += len(got)
        if got != choices[:len(got)]:
            self.stats.tokens_mismatched += len(got)
            logger.warning("tensor-parallel follower: %s got %s from rank 0 but sampled %s", shadow.request_id,
                           got, choices[:len(got)])


def follow(engine, group: TPGroup | None = None, check_sampling: bool | None = None) -> FollowStats:
    """Run ``engine`` (built without the automatic hook) as a follower of rank 0 until rank 0 closes the group."""
    return Follower(engine, group or TPGroup.default(), check_sampling).run()


def tensor_parallel(engine):
    """The engine's part in a tensor-parallel group: None for a model that is not sharded; on rank 0 the
    :class:`PlanSender` its runner now is; on the others a :class:`~hf_turbo.engine.follower.Follower` to
    ``run()`` (``Engine.follow``), while the engine's own runner refuses steps."""
    if model_tp_size(engine.model) == 1:
        return None
    group = TPGroup.default()
    if group.is_driver:
        return attach(engine, group)
    follower = Follower(engine, group)
    engine.runner = _FollowerRunner(engine.runner, group.rank)
    return follower
