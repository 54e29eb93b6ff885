"""How much to speculate each step: the k (and the requests) that maximize the batch's tokens per second.

If each proposal of request i is accepted with probability ``a_i`` (independently), a verify step
with k proposals emits ``E(a_i, k) = (1 - a_i^(k+1)) / (1 - a_i)`` tokens for it on average. A step
of a B-request batch where n requests speculate with k proposals each costs, relative to a plain
decode step (``t0 = alpha + beta * B`` seconds)::

    (t0 + beta * n * k + draft * k) / t0        # verifying n*k more tokens, k draft forwards

so its throughput relative to plain decoding is ``(B + sum_i (E(a_i, k) - 1)) / B`` divided by that.
:meth:`AdaptiveK.plan` evaluates every k in ``1..k_max`` with the n best-accepting requests (all n)
and keeps the best, or plain decoding (k = 0) if nothing beats it: speculation stops where it would
be slower, e.g. in a large batch on a compute-bound device. After ``PROBE_EVERY`` plain steps a few
requests (``PROBE_REQUESTS``, in turn) are probed with k = 1, then twice as late each time the
probe does not pay, so a phase change (an output that starts copying its input) is noticed at a
bounded cost.

``a_i`` is an exponentially weighted count of accepted / tried proposals (m accepted of k is m
successes and, if m < k, one failure); a request not measured yet gets the same count pooled over
every request's verify steps, and before any verify step at all only ``PROBE_REQUESTS`` requests try
k = 1 (a prior is no reason to have a draft catch up with a whole batch's prompts). ``alpha``,
``beta`` come from :class:`StepCost`, a fit of the target's measured step times; ``draft`` is the
draft's measured forward time (0 for n-gram lookup).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["AdaptiveK", "StepCost", "expected_tokens"]

PRIOR_ACCEPTED, PRIOR_TRIED = 0.7, 1.0  # start at a = 0.7, weighing less than one verify step
DECAY = 0.8  # weight of the past per verify step: the last ~5 steps dominate
PROBE_EVERY = 16  # plain steps before probing with k = 1 (doubling per probe that did not pay)
MAX_PROBE_EVERY = 256
PROBE_REQUESTS = 4  # requests probed at once (in turn through the batch)
STEP_DECAY = 0.98  # weight of the past per step in the step-time fit: the last ~50 steps dominate
WARMUP_STEPS = 1  # first steps left out of the fit: lazy KV-pool allocation, kernel compilation
OUTLIER = 4.0  # a step this many times slower than the fit predicts is left out (up to 3 in a row)
# relative costs (fractions of a plain step) until the fit has data: a verified token, a draft forward
PRIOR_TOKEN_COST, PRIOR_DRAFT_COST = 0.01, 0.2


def expected_tokens(a: float, k: int) -> float:
    """Mean tokens emitted by one verify step with k proposals, each accepted with probability a."""
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


@dataclass
class _Acceptance:
    accepted: float = PRIOR_ACCEPTED
    tried: float = PRIOR_TRIED

    @property
    def rate(self) -> float:
        return self.accepted / self.tried


class AdaptiveK:
    """Plans each step's proposals (``k_max`` for every request when not ``adaptive``) and learns
    each request's acceptance from the verify steps."""

    def __init__(self, k_max: int, adaptive: bool = True) -> None:
        self.k_max = k_max
        self.adaptive = adaptive
        self._acceptance: dict[str, _Acceptance] = {}
        self._idle = 0  # plain steps since the last speculative one
        self._probe_every = PROBE_EVERY
        self._probe_next = 0  # where in the batch the next probe starts
        self._pooled: _Acceptance | None = None  # every request's verify steps together (None: none yet)

    def plan(self, request_ids: Sequence[str], caps: Sequence[int], batch: int, token_cost: float,
             draft_cost: float, drain: bool = False) -> list[int]:
        """k per request (at most its cap) for a step of ``batch`` requests, where verifying a token
        costs ``token_cost`` and a draft forward ``draft_cost`` (fractions of a plain step).

        ``drain``: nothing is waiting, so a request that finishes sooner frees a slot nobody takes and
        only the batch's last request sets the wall time. Then every candidate speculates with the same
        k or none does, and k is judged by steps until the batch is done (the slowest request's
        remaining tokens over its expected tokens per step), not by tokens per step.
        """
        if not self.adaptive:
            return [min(self.k_max, c) for c in caps]
        rates = [self.rate(r) for r in request_ids]
        if drain:
            best_k, best_n = self._plan_drain(rates, caps, token_cost, draft_cost)
            order = list(range(len(rates)))
        else:
            best_k, best_n, order = self._plan_throughput(rates, caps, batch, token_cost, draft_cost)
        if best_k:
            self._idle, self._probe_every = 0, PROBE_EVERY
            chosen = set(order[:best_n])
            if self._pooled is None and len(chosen) > PROBE_REQUESTS:
                # nothing measured yet, only the prior says it pays: try a few requests before a whole
                # batch (a draft would first have to catch up with every request's prompt), in turn, as
                # a request may have nothing to propose (no n-gram match)
                chosen, best_k = self._take_turns(sorted(chosen)), 1
            return [min(best_k, c) if i in chosen else 0 for i, c in enumerate(caps)]
        self._idle += 1
        if self._idle < self._probe_every:
            return [0] * len(caps)
        self._idle, self._probe_every = 0, min(2 * self._probe_every, MAX_PROBE_EVERY)
        probed = self._take_turns(list(range(len(caps))))
        return [min(1, c) if i in probed else 0 for i, c in enumerate(caps)]

    def plain_steps_left(self) -> int:
        """After a plan that chose plain decoding: the plain steps still due before the next probe."""
        return max(self._probe_every - self._idle - 1, 0)

    def skip(self) -> None:
        """Count a plain step that was not planned (the last plan chose plain and its inputs stand)."""
        self._idle += 1

    def _take_turns(self, candidates: list[int]) -> set[int]:
        """The next ``PROBE_REQUESTS`` of ``candidates`` (batch indices), going round them step by step."""
        first = self._probe_next % len(candidates)
        self._probe_next = first + PROBE_REQUESTS
        return {candidates[(first + j) % len(candidates)] for j in range(min(PROBE_REQUESTS, len(candidates)))}

    def _plan_throughput(self, rates: list[float], caps: Sequence[int], batch: int, token_cost: float,
                         draft_cost: float) -> tuple[int, int, list[int]]:
        """Best (k, n, order) by tokens per second: the n best-accepting requests (in ``order``) speculate."""
        order = sorted(range(len(rates)), key=lambda i: -rates[i])
        best, best_k, best_n = 1.0, 0, 0  # plain decoding: throughput ratio 1
        for k in range(1, self.k_max + 1):
            gain = tokens = 0.0
            for n, i in enumerate(order, 1):
                kk = min(k, caps[i])
                gain += expected_tokens(rates[i], kk) - 1.0
                tokens += kk
                ratio = (batch + gain) / batch / (1.0 + token_cost * tokens + draft_cost * k)
                if ratio > best:
                    best, best_k, best_n = ratio, k, n
        return best_k, best_n, order

    def _plan_drain(self, rates: list[float], caps: Sequence[int], token_cost: float,
                    draft_cost: float) -> tuple[int, int]:
        """Best (k, n = all or 0) by the steps the whole batch still needs (see ``plan``)."""
        plain_steps = max(c + 1 for c in caps)  # caps: tokens left after this step's own token
        best, best_k = 1.0, 0
        for k in range(1, self.k_max + 1):
            steps = max((c + 1) / expected_tokens(a, min(k, c)) for a, c in zip(rates, caps))
            tokens = sum(min(k, c) for c in caps)
            ratio = plain_steps / steps / (1.0 + token_cost * tokens + draft_cost * k)
            if ratio > best:
                best, best_k = ratio, k
        return best_k, len(rates) if best_k else 0

    def record(self, request_id: str, k: int, accepted: int) -> None:
        """A verify step of ``request_id`` had ``k`` proposals and accepted the first ``accepted``."""
        if self._pooled is None:
            self._pooled = _Acceptance()
        for st in (self._acceptance.setdefault(request_id, _Acceptance()), self._pooled):
            st.accepted = DECAY * st.accepted + accepted
            st.tried = DECAY * st.tried + accepted + (accepted < k)

    def rate(self, request_id: str) -> float:
        """The request's acceptance; for one not measured yet, that of the latest verify steps of any request."""
        st = self._acceptance.get(request_id) or self._pooled
        return st.rate if st is not None else PRIOR_ACCEPTED / PRIOR_TRIED

    def release(self, request_id: str) -> None:
        self._acceptance.pop(request_id, None)


class StepCost:
    """Least-squares fit of a step's seconds as ``alpha + beta * tokens``, recent steps weighing more."""

    def __init__(self) -> None:
        self._sums = [0.0] * 5  # weighted sums of 1, x, y, x^2, x*y
        self._seen = 0
        self._outliers = 0

    def add(self, tokens: int, seconds: float) -> None:
        self._seen += 1
        if self._seen <= WARMUP_STEPS:
            return
        fitted = self.fit()
        if fitted is not None and seconds > OUTLIER * (fitted[0] + fitted[1] * tokens) and self._outliers < 3:
            self._outliers += 1  # a hiccup (allocation, compilation, another process), not the cost of tokens
            return
        self._outliers = 0
        s = [STEP_DECAY * v for v in self._sums]
        x, y = float(tokens), seconds
        for i, v in enumerate((1.0, x, y, x * x, x * y)):
            s[i] += v
        self._sums = s

    def fit(self) -> tuple[float, float] | None:
        """(alpha seconds, beta seconds per token), or None until the token counts have varied."""
        w, sx, sy, sxx, sxy = self._sums
        det = w * sxx - sx * sx  # w^2 * (weighted variance of the token counts)
        if w < 2 or det < 0.25 * w * w:
            return None
        beta = max((w * sxy - sx * sy) / det, 0.0)
        return max((sy - beta * sx) / w, 0.0), beta

    def relative_costs(self, batch: int, draft_seconds: float | None) -> tuple[float, float]:
        """(a verified token, a draft forward) as fractions of a plain ``batch``-request step.
        ``draft_seconds`` None: no draft (n-gram lookup); 0: a draft not timed yet."""
        fitted = self.fit()
        step = None if fitted is None else fitted[0] + fitted[1] * batch
        if not step:
            return PRIOR_TOKEN_COST, 0.0 if draft_seconds is None else PRIOR_DRAFT_COST
        draft = 0.0 if draft_seconds is None else (draft_seconds / step if draft_seconds else PRIOR_DRAFT_COST)
        return fitted[1] / step, draft
