"""The exactness contract ``hf-turbo eval`` checks, its thresholds, and the verdict on each result row.

Thresholds, and why:

- float32 near-tie: stock's top-2 score gap below ``NEAR_TIE_FP32`` = 1e-4. Two correct float32
  computations that only sum in another order differ by a few ulps of the hidden state, which moves
  logits of size ~10 by ~1e-6..1e-5; a gap under 1e-4 can flip, a larger one cannot.
- bfloat16 near-tie: gap below ``NEAR_TIE_BF16`` = 0.125. bfloat16 keeps 8 significant bits, so a
  logit near 10 is stored to a spacing (ulp) of 2^-4 = 0.0625 and each rounding moves it by up to
  0.03; logits in [8, 16) that differ by one or two ulps (0.0625, 0.125) lie within what a changed
  accumulation order moves. The gap is measured on stock's bfloat16 scores, which are themselves
  multiples of that ulp, so "< 0.125" admits exact ties and one-ulp gaps only at that scale.
- float16 near-tie: ``NEAR_TIE_FP16`` = 0.0156 (11 significant bits: one ulp near 10 is 2^-7).
- teacher-forced log-likelihoods (accelerated packed forward vs stock forward, same tokens): the
  largest absolute difference must stay below ``TEACHER_FORCED_TOL`` of the dtype (1e-3 nats in
  float32); a wrong attention scale or mask moves them by 0.1 or more.
"""

from __future__ import annotations

from pathlib import Path

from hf_turbo.eval.exactness import NEAR_TIE_FP32

# the ``turbo_equivalence`` metric: an ``evaluate`` module loaded by path
METRIC_PATH = str(Path(__file__).parent / "metric" / "turbo_equivalence.py")

__all__ = ["CONTRACT", "NEAR_TIE_FP32", "NEAR_TIE_BF16", "NEAR_TIE_FP16", "TEACHER_FORCED_TOL",
           "near_tie_threshold", "teacher_forced_tol", "PASS", "FAIL", "SKIP", "INFO", "REF", "ERROR"]

NEAR_TIE_BF16 = 0.125
NEAR_TIE_FP16 = 2.0**-6
_NEAR_TIE = {"float32": NEAR_TIE_FP32, "bfloat16": NEAR_TIE_BF16, "float16": NEAR_TIE_FP16}
TEACHER_FORCED_TOL = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}

PASS, FAIL, SKIP, INFO, REF, ERROR = "PASS", "FAIL", "SKIP", "INFO", "REF", "ERROR"

CONTRACT = f"""\
**The hf_turbo exactness contract** (what `hf-turbo eval` checks; exit status 1 when it fails).

1. **float32, greedy: identical to stock.** Every sequence that hf_turbo generates equals stock
   `generate()` (one prompt at a time, no padding) token for token, or diverges only at a genuine
   near-tie: stock's top-2 score gap at that step is below {NEAR_TIE_FP32:g} **and** hf_turbo's token
   is stock's second choice (generally: stock scored hf_turbo's token within {NEAR_TIE_FP32:g} of its
   own choice, which also admits ties of three or more tokens). Every divergence is listed with
   its position, both tokens, the top-2 gap and the gap of hf_turbo's token.
2. **float32, across axes: identical.** The same holds whatever the batch composition (direct
   accelerated `generate()`, one `Engine` batch, `AsyncEngine` with staggered arrival), chunked
   prefill, preemption and recomputation, a cold or warm prefix cache, and speculative decoding
   (draft model and n-gram): no axis raises, and none leaks KV blocks. Seeded sampling draws the
   same tokens on every axis as in one `Engine` batch (it is keyed by seed and position).
3. **bfloat16 (and float16): near-ties only.** The exact-match rate is reported, and every
   divergence from stock must be a near-tie at the dtype's rounding: gap below {NEAR_TIE_BF16:g} in
   bfloat16 (8 significant bits: a logit near 10 has an ulp of 0.0625, so this admits ties and
   one-ulp gaps) or {NEAR_TIE_FP16:g} in float16, for hf_turbo's token (stock's second choice, or
   one of several tokens stock scored exactly alike: bfloat16 ties are common).
   Seeded sampling across axes is reported, not required, in these dtypes.
4. **Teacher forcing.** The log-likelihood of the same tokens under hf_turbo's packed paged forward
   and under stock's forward differ by at most {TEACHER_FORCED_TOL['float32']:g} nats in float32
   ({TEACHER_FORCED_TOL['bfloat16']:g} in bfloat16).

An axis that cannot run here (speculative decoding not built, no draft model) is reported as
skipped, never as passed.
"""


def near_tie_threshold(dtype: str) -> float:
    """The top-2 gap below which a divergence counts as a near-tie in ``dtype``."""
    try:
        return _NEAR_TIE[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_NEAR_TIE)}, got {dtype!r}") from None


def teacher_forced_tol(dtype: str) -> float:
    """Largest allowed |log p_turbo - log p_stock| under teacher forcing in ``dtype``."""
    try:
        return TEACHER_FORCED_TOL[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(TEACHER_FORCED_TOL)}, got {dtype!r}") from None
