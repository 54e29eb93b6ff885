"""``sample``: one token per row, greedy or keyed, every row of a step in one batched pass.

Greedy rows take the argmax of the processed scores (stock ``generate()``'s choice). Sampled rows are
scaled by their temperature, filtered (``filters``: transformers' kept set, on the CPU through top-K
candidates, on CUDA through the reference ops, whose sort is cheap there and needs no host decision)
and pick ``argmax(x + G)`` over the kept tokens with the keyed Gumbel noise of ``noise``: a seeded row
draws the same token whatever the batch, the step, the path that proved its kept set, preemption or
speculation. The tokens reach the host in one copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hf_turbo.sampling.filters import candidate_filter, reference_filter
from hf_turbo.sampling.noise import perturbed_argmax, row_keys
from hf_turbo.sampling.params import RowState
from hf_turbo.sampling.processors import apply_penalties, scale_by_temperature
from hf_turbo.sampling.workspace import on_device, scratch

__all__ = ["sample", "process_logits", "SampleResult", "needs_processing"]


class SampleResult:
    """The sampler's output: ``tokens`` (int64 [N], on the host) and, on demand, the processed scores of a
    row (what HF's ``output_scores`` holds: -inf where a filter removed the token). The scores may live in
    the sampler's scratch buffers: read (or clone) them before the next ``sample`` call in this thread."""

    def __init__(self, tokens: torch.Tensor, scores: torch.Tensor, dense: dict[int, torch.Tensor]) -> None:
        self.tokens = tokens
        self._scores = scores  # after the processors (and temperature for sampled rows)
        self._dense = dense  # row -> masked scores, for filtered rows

    def scores(self, row: int) -> torch.Tensor:
        """Processed scores [V] of ``row``."""
        out = self._dense.get(row)
        return self._scores[row] if out is None else out


def needs_processing(rows: Sequence[RowState]) -> bool:
    """Whether a row needs the processors (penalties, bias, EOS suppression, a hook, a grammar mask)."""
    for r in rows:
        p = r.params
        if r.hook is not None or r.mask is not None or p.logit_bias or r.position < p.min_new_tokens and r.eos_ids:
            return True
        if p.needs_history and r.history:
            return True
    return False


def sample(logits: torch.Tensor, rows: Sequence[RowState], return_scores: bool = False,
           num_candidates: int = 256):
    """Pick one token per row. ``logits`` [N, V] (any float dtype, not modified). Returns int64 [N] on the
    host; with ``return_scores`` a :class:`SampleResult` (tokens plus each row's processed scores)."""
    scores = logits.float()
    if needs_processing(rows):
        if scores is logits:  # the caller keeps its logits (raw logits, logprobs)
            scores = scratch("processed", tuple(logits.shape), torch.float32, logits.device).copy_(logits)
        scores = apply_penalties(scores, rows)
    n, vocab = scores.shape
    device = scores.device
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    dense: dict[int, torch.Tensor] = {}
    if not sampled:
        tokens = scores.argmax(dim=-1)
        host = tokens.cpu()
        return SampleResult(host, scores, dense) if return_scores else host
    tokens = scores.argmax(dim=-1) if len(sampled) < n else torch.empty(n, dtype=torch.long, device=device)
    params = [rows[i].params for i in sampled]
    idx = on_device(sampled, None, device)
    temp = on_device([[p.temperature] for p in params], torch.float32, device)
    x = scale_by_temperature(scores.index_select(0, idx) if len(sampled) < n else scores, temp)
    keys = row_keys([rows[i].seed for i in sampled], [rows[i].position for i in sampled], device)
    filt = [j for j, p in enumerate(params) if p.has_filters]
    plain = [j for j, p in enumerate(params) if not p.has_filters]
    picked = torch.empty(len(sampled), dtype=torch.long, device=device)
    if plain:
        sel = on_device(plain, None, device)
        picked[sel] = perturbed_argmax(x[sel], keys[sel])
    if filt:
        fx = x if len(filt) == len(sampled) else x[filt]
        args = ([params[j].top_k for j in filt], [params[j].top_p for j in filt], [params[j].min_p for j in filt])
        if device.type == "cpu":
            cands, ref_rows, ref = candidate_filter(fx, *args, num_candidates=num_candidates)
        else:
            cands, ref_rows, ref = None, list(range(len(filt))), reference_filter(fx, *args)
        if cands is not None and cands.rows:
            sel = on_device([filt[r] for r in cands.rows], None, device)
            picked[sel] = perturbed_argmax(cands.values.masked_fill(~cands.keep, -math.inf), keys[sel], cands.ids)
            if return_scores:
                dense.update(zip((sampled[filt[r]] for r in cands.rows), cands.dense(vocab)))
        if ref_rows:
            sel = on_device([filt[r] for r in ref_rows], None, device)
            picked[sel] = perturbed_argmax(ref, keys[sel])
            if return_scores:
                dense.update(zip((sampled[filt[r]] for r in ref_rows), ref))
    tokens[idx] = picked
    host = tokens.cpu()
    if not return_scores:
        return host
    if len(sampled) == n:
        scores = x
    else:
        scores = scores.index_copy(0, idx, x)
    return SampleResult(host, scores, dense)


def process_logits(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """Every row's processed scores [N, V]: transformers' processors and warpers in order (the oracle)."""
    scores = apply_penalties(logits.float().clone(), rows)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        params = [rows[i].params for i in sampled]
        temp = torch.tensor([[p.temperature] for p in params], dtype=torch.float32, device=scores.device)
        x = reference_filter(scale_by_temperature(scores[sampled], temp), [p.top_k for p in params],
                             [p.top_p for p in params], [p.min_p for p in params])
        scores[sampled] = x
    return scores
