"""The quantized-KV rows of ``hf-turbo eval --axes kv_quant``: what an 8-bit KV cache costs on this model.

Per 8-bit ``kv_dtype`` this device runs, against the same engine with the unquantized cache on the eval's own
prompts: the teacher-forced per-token log-likelihood delta (mean and max |delta| over prompt + stock
continuation) and the greedy exact-match rate. Informational (status INFO): an 8-bit cache is an opt-in that
changes the numbers attention sees, so it is not held to the exactness contract.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from hf_turbo.backends import kv_dtype_unsupported
from hf_turbo.backends.kv_quant import KV_QUANT
from hf_turbo.eval import contract
from hf_turbo.eval.axes import AXES, EvalTarget

logger = logging.getLogger(__name__)

__all__ = ["kv_dtypes_for", "kv_quant_rows"]


def kv_dtypes_for(device: torch.device) -> list[str]:
    """The 8-bit kv_dtypes that run on ``device``: all on the CPU (the reference backend's torch casts); on CUDA
    int8 everywhere and fp8 from compute capability 8.9 (the Triton kernels' fp8 conversions)."""
    return [kv for kv in KV_QUANT if kv_dtype_unsupported(kv, device) is None]


def kv_quant_rows(target: EvalTarget, greedy: list, base_outputs: list[list[int]] | None,
                  base_logprobs: list[list[float]], seqs: list[list[int]], make_row, logprobs) -> list[dict]:
    """One row per runnable 8-bit kv_dtype. ``base_outputs``: the unquantized engine's greedy tokens (run here
    when None); ``base_logprobs``: its teacher-forced log-likelihoods of ``seqs``; ``make_row(axis, mode,
    **fields)`` builds a report row; ``logprobs(config)``: teacher-forced log-likelihoods of ``seqs`` under it."""
    if base_outputs is None:
        base_outputs = AXES["engine"](target, greedy).outputs
    rows = []
    device = next(target.model.parameters()).device
    for kv in kv_dtypes_for(device):
        try:
            quant = dataclasses.replace(target, config=target.config.replace(kv_dtype=kv))
            outs = AXES["engine"](quant, greedy).outputs
            got = logprobs(quant.config)
        except Exception as exc:  # informational: report it, never fail the run on it
            logger.debug("kv_quant %s raised", kv, exc_info=True)
            rows.append(make_row("kv_quant", kv, status=contract.INFO, error=f"{type(exc).__name__}: {exc}"))
            continue
        deltas = torch.tensor([abs(a - b) for x, y in zip(base_logprobs, got) for a, b in zip(x, y)])
        exact = sum(a == b for a, b in zip(outs, base_outputs)) / max(1, len(outs))
        total = sum(max(len(a), len(b)) for a, b in zip(outs, base_outputs))
        same = sum(x == y for a, b in zip(outs, base_outputs) for x, y in zip(a, b))
        mean, worst = float(deltas.mean()), float(deltas.max())
        rows.append(make_row(
            "kv_quant", kv, status=contract.INFO, num_sequences=len(outs), exact_match=exact,
            token_match=same / max(1, total),
            stats={"mean_abs_dlogp": mean, "max_abs_dlogp": worst, "num_tokens": int(deltas.numel())},
            note=f"vs the unquantized cache: |dlogp| mean {mean:.2e} max {worst:.2e}; greedy exact match "
                 f"{exact:.2f} (informational)"))
    return rows
