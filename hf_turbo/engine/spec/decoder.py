"""Speculative decoding inside the Engine's step: proposals before the schedule, acceptance after it.

One step, for a running request in decode (only its last sampled token uncomputed)::

    propose:  spec_tokens = d_1..d_k                    (n-gram lookup or draft model, batched)
    forward:  [t_last, d_1..d_k] in the step's single varlen forward, logits at all 1 + k rows
    choose:   c_j = the target's token at output position p + j (greedy argmax, or the request's
              keyed noise of position p + j: exactly what a step without speculation would pick)
    accept:   m = longest prefix with d_{j+1} == c_j; emit c_0..c_m (1 to k + 1 tokens)

Because c_j is what plain decoding would emit given the same prefix, the output is token for token
the output without speculation, greedy or seeded sampling alike (coupled sampling). The KV of
t_last, d_1..d_m is kept; the engine rolls ``num_computed`` back past the rejected d_{m+1}.. before
the scheduler commits, and frees blocks that held only rejected slots.
"""

from __future__ import annotations

import logging

from hf_turbo.config import SpeculativeConfig, TurboConfig
from hf_turbo.engine.request import Request
from hf_turbo.engine.spec.adaptive import AdaptiveK, StepCost
from hf_turbo.engine.spec.proposers import DraftModelProposer, NgramProposer

logger = logging.getLogger(__name__)

__all__ = ["SpecDecoder", "num_accepted"]

# A step that would speculate runs plain instead at the 2nd such step and every EXPLORE_EVERY-th after:
# the step-time fit needs steps of different sizes to tell the fixed cost from the per-token cost.
EXPLORE_EVERY = 16
MAX_CATCH_UP = 4  # requests the draft model starts following per step


def num_accepted(proposals: list[int], choices: list[int]) -> int:
    """Length of the longest prefix of ``proposals`` equal to the target's ``choices``."""
    m = 0
    while m < len(proposals) and proposals[m] == choices[m]:
        m += 1
    return m


class SpecDecoder:
    """The Engine's speculative-decoding state: a proposer, the adaptive k, and the counters."""

    def __init__(self, config: SpeculativeConfig, turbo: TurboConfig, num_blocks: int) -> None:
        """``config.draft_model`` must have passed :func:`validate_draft` (the Engine checks it first)."""
        self.config = config
        if config.method == "draft":
            self.proposer = DraftModelProposer(config.draft_model, num_blocks, turbo.cache.block_size,
                                               turbo.backend, turbo.max_num_batched_tokens,
                                               prefix_caching=turbo.cache.enable_prefix_caching,
                                               lean=turbo.lean_forward)
        else:
            self.proposer = NgramProposer(config.ngram_max, config.ngram_min)
        self.k = AdaptiveK(config.num_tokens, config.adaptive)
        self.step_cost = StepCost()  # the target's step time (forward + sampling) vs its tokens
        self._holding: dict[str, Request] = {}  # requests the proposer keeps state for
        self.num_proposed = self.num_accepted = self.num_verify_steps = self.num_emitted = self.num_rejected = 0
        self._spec_steps = 0  # steps that would have speculated
        # after a plan chose plain decoding: (batch size, draining), plain steps left before the next probe.
        # Those steps skip planning (~0.2 ms a step in Python, a tenth of a small model's batch-1 step):
        # nothing the plan reads changes without a verify step, but the batch
        self._quiet: tuple[tuple[int, bool], int] | None = None

    def propose(self, running: list[Request], waiting: int = 0) -> None:
        """Set ``spec_tokens`` of every running request (empty where it does not speculate).

        ``waiting``: requests queued behind the running ones (0: the batch is draining)."""
        live = {r.request_id for r in running}
        for rid in [rid for rid in self._holding if rid not in live]:  # preempted: drop the proposer's copy
            self.proposer.release(self._holding.pop(rid))
        for req in running:
            req.spec_tokens.clear()
        if len(running) > self.config.max_batch_for_spec:
            return
        shape = (len(running), waiting == 0)
        if self._quiet is not None and self._quiet[0] == shape and self._quiet[1] > 0:
            self._quiet = (shape, self._quiet[1] - 1)
            self.k.skip()
            return
        self._quiet = None
        # requests in decode; a verify step emits up to k + 1 tokens, never past max_new_tokens
        cands = [r for r in running if r.params.speculative and r.num_tokens - r.num_computed == 1
                 and r.params.max_new_tokens - r.num_output_tokens > 1]
        if not cands:
            return
        draft_seconds = getattr(self.proposer, "forward_seconds", None)  # None: no draft model
        token_cost, draft_cost = self.step_cost.relative_costs(len(running), draft_seconds)
        ks = self.k.plan([r.request_id for r in cands],
                         [r.params.max_new_tokens - r.num_output_tokens - 1 for r in cands],
                         len(running), token_cost, draft_cost, drain=waiting == 0)
        if self.config.adaptive and not any(ks):
            self._quiet = (shape, self.k.plain_steps_left())
        reqs = [(r, k) for r, k in zip(cands, ks) if k > 0]
        if self.config.method == "draft" and self.config.adaptive:
            # a request the draft has not seen costs a prefill of its whole context first: admit a few per
            # step, so that a wrong guess about the batch costs a few prefills, not a batch's worth
            new = [i for i, (r, _) in enumerate(reqs) if r.request_id not in self._holding][MAX_CATCH_UP:]
            skip = set(new)
            reqs = [rk for i, rk in enumerate(reqs) if i not in skip]
        if not reqs:
            return
        self._spec_steps += 1
        if self._spec_steps == 2 or self._spec_steps % EXPLORE_EVERY == 0:
            return  # a plain step now and then keeps the step-time fit honest
        for (req, _), proposals in zip(reqs, self.proposer.propose([r for r, _ in reqs], [k for _, k in reqs])):
            req.spec_tokens.extend(proposals)
            self._holding[req.request_id] = req

    def accept(self, req: Request, choices: list[int]) -> list[int]:
        """The tokens a verify step emits: the accepted proposals, then the target's own next token."""
        m = num_accepted(req.spec_tokens, choices)
        if req.spec_tokens:
            self.k.record(req.request_id, len(req.spec_tokens), m)
            self.num_proposed += len(req.spec_tokens)
            self.num_accepted += m
            self.num_verify_steps += 1
            self.num_emitted += m + 1
            self.num_rejected += m < len(req.spec_tokens)
        return choices[:m + 1]

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """The target's forward + sampling of ``num_tokens`` tokens took ``seconds``."""
        self.step_cost.add(num_tokens, seconds)

    def release(self, req: Request) -> None:
        """The request finished or was aborted: forget it."""
        self._holding.pop(req.request_id, None)
        self.proposer.release(req)
        self.k.release(req.request_id)

    def check_invariants(self) -> None:
        check = getattr(self.proposer, "check_invariants", None)
        if check is not None:
            check()

    def close(self) -> None:
        self.proposer.close()
        self._holding.clear()

    @staticmethod
    def idle_stats() -> dict:
        """The counters of an engine without speculation."""
        return {"spec_proposed": 0, "spec_accepted": 0, "acceptance_rate": 0.0, "mean_accepted_per_step": 0.0,
                "spec_verify_steps": 0, "spec_position_acceptance": 0.0}

    def stats(self) -> dict:
        return {
            "spec_proposed": self.num_proposed,
            "spec_accepted": self.num_accepted,
            "acceptance_rate": self.num_accepted / self.num_proposed if self.num_proposed else 0.0,
            "mean_accepted_per_step": self.num_emitted / self.num_verify_steps if self.num_verify_steps else 0.0,
            "spec_verify_steps": self.num_verify_steps,
            # P(a proposal is accepted | the ones before it were): the ``a`` of (1 - a^(k+1)) / (1 - a)
            "spec_position_acceptance": self.num_accepted / (self.num_accepted + self.num_rejected)
            if self.num_proposed else 0.0,
        }
