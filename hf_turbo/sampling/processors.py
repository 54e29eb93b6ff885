"""The processors before the filters, batched over rows with different parameters.

Order (transformers' where it has the processor, vLLM's for the OpenAI penalties): repetition penalty,
presence/frequency penalties, ``logit_bias``, EOS suppression before ``min_new_tokens``, the row's
``hook`` (generate()'s extra HF processors), the grammar ``mask``, then temperature. Arithmetic follows transformers'
processors operation for operation, so greedy rows give stock ``generate()``'s argmax bit for bit.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch

from hf_turbo.grammar.masks import apply_masks
from hf_turbo.sampling.params import RowState
from hf_turbo.sampling.workspace import on_device, scratch

__all__ = ["apply_penalties", "scale_by_temperature", "div_like_scalar"]


def div_like_scalar(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``x / d`` (``d`` float32 per row) with the arithmetic of ``x / python_float``, as transformers divides:
    a true division on the CPU; on CUDA, a multiply by the float32 reciprocal (ATen's path for a CPU scalar)."""
    if x.device.type == "cuda":
        return x * torch.reciprocal(d)
    return x / d


def apply_penalties(scores: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """Every processor before temperature, in place on ``scores`` [N, V] float32; returns ``scores``."""
    device, vocab = scores.device, scores.shape[-1]
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0 and r.history]
    if rep:
        # transformers: gather, where(s < 0, s * p, s / p), scatter; rows padded with their own first id
        # (a repeated id writes the same value again)
        hist = [list(rows[i].history) for i in rep]
        width = max(len(h) for h in hist)
        ids = on_device([h + [h[0]] * (width - len(h)) for h in hist], torch.long, device)
        pen = on_device([[rows[i].params.repetition_penalty] for i in rep], torch.float32, device)
        at = (on_device(rep, torch.long, device)[:, None], ids)  # [r, 1], [r, L]
        s = scores[at]
        scores[at] = torch.where(s < 0, s * pen, div_like_scalar(s, pen))
    r_idx, t_idx, add = [], [], []
    for i, row in enumerate(rows):
        p = row.params
        if (p.presence_penalty or p.frequency_penalty) and row.history and row.position > 0:
            for tok, n in Counter(list(row.history)[-row.position:]).items():
                r_idx.append(i)
                t_idx.append(tok)
                add.append(-(p.presence_penalty + p.frequency_penalty * n))
        for tok, bias in (p.logit_bias or {}).items():
            if tok < vocab:
                r_idx.append(i)
                t_idx.append(tok)
                add.append(bias)
    if r_idx:
        scores.index_put_((on_device(r_idx, None, device), on_device(t_idx, None, device)),
                          on_device(add, torch.float32, device), accumulate=True)
    eos = [(i, e) for i, row in enumerate(rows) if row.position < row.params.min_new_tokens for e in row.eos_ids
           if e < vocab]
    if eos:
        r, c = zip(*eos)
        scores[list(r), list(c)] = -math.inf
    for i, row in enumerate(rows):
        if row.hook is not None:
            out = row.hook(scores[i:i + 1])
            if not isinstance(out, torch.Tensor) or out.shape != (1, vocab):
                raise ValueError(f"logits_hook must return a [1, {vocab}] tensor, got "
                                 f"{getattr(out, 'shape', type(out).__name__)}")
            scores[i] = out[0]
    if any(row.mask is not None for row in rows):
        apply_masks(scores, [row.mask for row in rows])
    return scores


def scale_by_temperature(scores: torch.Tensor, temperature: torch.Tensor, graph_safe: bool = False) -> torch.Tensor:
    """``scores / temperature`` (float32 [n, 1]) as transformers' TemperatureLogitsWarper (dividing by 1.0 is
    exact, so rows at 1.0 match a skipped warper), except where that overflows: a row whose maximum
    divided by its temperature is not finite (temperatures down to the smallest subnormal, or 0 after a
    flush) gets the T -> 0 limit, 0 at its maximal scores and -inf elsewhere, instead of inf - inf = NaN
    in the softmax. The result lives in a reused scratch buffer (valid until the next call); ``graph_safe``: in
    a fresh tensor, with no host decision (what a CUDA graph capture needs; the same values)."""
    shape = tuple(scores.shape)
    out = torch.empty(shape, dtype=torch.float32, device=scores.device) if graph_safe \
        else scratch("scaled", shape, torch.float32, scores.device)
    if scores.device.type == "cuda":
        torch.mul(scores, torch.reciprocal(temperature), out=out)
    else:
        torch.div(scores, temperature, out=out)
    top = scores.amax(dim=-1, keepdim=True)
    bad = ~torch.isfinite(div_like_scalar(top, temperature)) & torch.isfinite(top)
    if graph_safe or scores.device.type != "cpu" or bool(bad.any()):
        out.copy_(torch.where(bad, torch.where(scores == top, 0.0, -math.inf), out))
    return out
