"""``hf-turbo eval``: does hf_turbo keep its exactness contract on this model, on this machine?

The contract (also in :data:`CONTRACT`, in every markdown report, and in the README):

1. float32, greedy: every sequence hf_turbo generates equals stock ``generate()`` token for token,
   or diverges only at a genuine near-tie (stock's top-2 score gap < ``NEAR_TIE_FP32`` = 1e-4 and
   hf_turbo's token is stock's second choice; generally, stock scored hf_turbo's token within 1e-4
   of its own choice); every divergence is listed.
2. float32, across axes (direct accelerated ``generate()``, one ``Engine`` batch, ``AsyncEngine``
   with staggered arrival, chunked prefill, preemption, cold and warm prefix cache, speculative
   decoding with a draft model and with n-grams, seeded sampling): identical outputs, no
   exception, no leaked KV block. Seeded sampling gives on every axis the tokens of one Engine batch.
3. bfloat16 (float16): the exact-match rate is reported and every divergence is a near-tie at the
   dtype's rounding (gap < 0.125 in bfloat16: 8 significant bits put one ulp of a logit near 10 at
   0.0625) for hf_turbo's token.
4. Teacher forcing: per-token log-likelihoods of the same text under hf_turbo's packed paged forward
   and stock's forward differ by at most 1e-3 nats in float32.

Everything runs locally: prompt sets are built here (:mod:`hf_turbo.eval.prompts`), the models
are the trained fixture, tiny random models of any architecture, or a local directory, and the
``turbo_equivalence`` metric is an ``evaluate`` module loaded from :data:`METRIC_PATH`.

Python::

    from hf_turbo.eval import EvalOptions, run_eval
    results = run_eval(EvalOptions.quick())
    assert results["passed"], results["divergences"]
"""

from __future__ import annotations

from hf_turbo.eval.cli import add_arguments, run
from hf_turbo.eval.contract import CONTRACT, METRIC_PATH
from hf_turbo.eval.options import EvalOptions

__all__ = ["add_arguments", "run", "run_eval", "EvalOptions", "CONTRACT", "METRIC_PATH"]



def run_eval(options: EvalOptions) -> dict:
    """Run the eval (see :func:`hf_turbo.eval.runner.run_eval`); imports datasets/evaluate on first use."""
    from hf_turbo.eval.runner import run_eval as _run_eval

    return _run_eval(options)
