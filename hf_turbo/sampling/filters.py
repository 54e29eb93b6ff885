"""Top-k, top-p and min-p with transformers' kept set, mostly without sorting the vocabulary.

``reference_filter`` is transformers' TopK -> TopP -> MinP warpers operation for operation, batched over
rows with different parameters (per-row ops give per-row results: torch's sort, softmax and cumsum
work row by row). ``candidate_filter`` gets the same kept set from each row's top ``K`` scores
(``torch.topk``), and falls back to the reference for a row only where it cannot prove the answer:

* top-k: the kept set is ``x >= kth`` (ties included), so the top ``K >= k`` candidates decide it,
  unless the ``K``-th candidate ties the ``k``-th (then ties may continue outside: more candidates).
* top-p: transformers keeps the token at ascending position ``j`` iff ``cumsum(softmax(sorted))_j >
  1 - top_p`` in float32. The exact cumulative mass ``A_j / S`` is computed from the candidates (float64)
  plus the rest of the row's mass (one exp-sum pass); transformers' float value differs from it by at
  most ``gamma = 2u(W + 80) + 20u`` relatively (``u = 2**-24``): a sum of positive terms accumulated in
  ascending order (sequentially, in vector lanes, in strided threads, or online with rescaling) errs by
  at most ``2u`` times the sum of its partial sums plus a combining tree of depth <= 64, and the
  partial sums total at most ``sum_i e_i * rank_i = W * S`` (``rank_i`` counted from the top: exact for
  the candidates, bounded by the vocabulary size for the rest); ``20u`` covers the exponentials, the
  reciprocal, the products and the final rounding. A candidate whose value lies beyond that margin
  on either side of the threshold is decided; a row with any candidate inside the margin, with a tie
  across the boundary, or whose kept set reaches the last candidate, is not.
* min-p: transformers removes ``p_i < min_p * p_max`` where both sides share the softmax's normaliser,
  so the decision is ``exp(x_i - max) < min_p`` up to a few roundings (margin ``16u``); the normaliser
  is never needed.

So no row's kept set is ever guessed: each is proven equal to transformers' or recomputed by its ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hf_turbo.sampling.workspace import on_device, scratch

__all__ = ["reference_filter", "candidate_filter", "Candidates", "mask_below_kth", "mask_min_p", "mask_top_p"]

_U = 2.0 ** -24
_NEG_INF = -math.inf


def _col(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return on_device(list(values), dtype, device).reshape(-1, 1)


def reference_filter(x: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float],
                     min_p: Sequence[float]) -> torch.Tensor:
    """Transformers' TopK, TopP and MinP warpers on the rows of ``x`` [n, V] (each row its own parameters;
    0 / 1.0 / 0.0 turn one off); returns the masked scores."""
    vocab, device = x.shape[1], x.device
    if any(k > 0 for k in top_k):
        kmax = min(max(top_k), vocab)
        ks = on_device([min(k, vocab) - 1 if k > 0 else 0 for k in top_k], None, device).reshape(-1, 1)
        x = mask_below_kth(x, torch.topk(x, kmax).values.gather(1, ks), _col([k > 0 for k in top_k], torch.bool,
                                                                             device))
    if any(p < 1.0 for p in top_p):
        x = mask_top_p(x, _col([1 - p for p in top_p], torch.float32, device),
                       _col([p < 1.0 for p in top_p], torch.bool, device))
    if any(m > 0.0 for m in min_p):
        x = mask_min_p(x, _col(min_p, torch.float32, device))
    return x


def mask_below_kth(x: torch.Tensor, kth: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Top-k as transformers' warper: scores below each row's ``kth`` value [n, 1] become -inf, in the rows
    where ``on`` [n, 1] (bool) holds."""
    return x.masked_fill(x < torch.where(on, kth, _NEG_INF), _NEG_INF)


def mask_top_p(x: torch.Tensor, threshold: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Top-p as transformers' warper: ascending, the tokens whose cumulative probability is at most
    ``threshold`` [n, 1] (float32 ``1 - top_p``) become -inf (never the last), in the rows where ``on`` holds."""
    sorted_logits, sorted_idx = torch.sort(x, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= threshold
    remove &= on
    remove[..., -1:] = False
    return x.masked_fill(remove.scatter(1, sorted_idx, remove), _NEG_INF)


def mask_min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Min-p as transformers' warper: tokens below ``min_p`` [n, 1] times the row's top probability become -inf
    (never the top one)."""
    probs = torch.softmax(x, dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
    return x.masked_fill(remove, _NEG_INF)


@dataclass
class Candidates:
    """Rows whose kept set lies within their top ``K`` tokens: ``ids``/``values`` [n, K] (descending),
    ``keep`` [n, K]; ``rows`` are their indices in the filtered batch."""

    rows: list[int]
    ids: torch.Tensor
    values: torch.Tensor
    keep: torch.Tensor

    def dense(self, vocab: int) -> torch.Tensor:
        """The masked scores [n, V]: the kept candidates' values, -inf elsewhere."""
        out = torch.full((len(self.rows), vocab), _NEG_INF, device=self.values.device)
        r, c = self.keep.nonzero(as_tuple=True)
        out[r, self.ids[r, c]] = self.values[r, c]
        return out


def _tail_mass(x: torch.Tensor, top: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float64 [n, 1]: sum of ``exp(x - top)`` over each row's tokens outside ``ids``. float32 exponentials
    summed 64 at a time (error <= 64u of the sum in any order), then in float64."""
    n, vocab = x.shape
    e = torch.sub(x, top, out=scratch("exp", (n, vocab), torch.float32, x.device)).exp_()
    e.scatter_(1, ids, 0.0)
    whole = vocab // 64 * 64
    tail = e[:, :whole].reshape(n, -1, 64).sum(dim=-1).double().sum(dim=-1, keepdim=True)
    return tail + e[:, whole:].double().sum(dim=-1, keepdim=True)


def _decide(x: torch.Tensor, k_cand: int, top_k: list[int], top_p: list[float], min_p: list[float]):
    """One candidate round over all rows of ``x``: (ids, values, keep, ok) with ``ok`` [n] the proven rows."""
    n, vocab = x.shape
    device = x.device
    vals, ids = torch.topk(x, k_cand)  # [n, K], descending
    top = vals[:, :1]
    keep = vals > _NEG_INF
    ok = torch.ones(n, dtype=torch.bool, device=device)
    # tokens outside the candidates may be kept (not when the last candidate is already -inf)
    open_tail = (vals[:, -1] > _NEG_INF) & (k_cand < vocab)
    pos = torch.arange(k_cand, device=device)
    if any(k > 0 for k in top_k):
        has_k = _col([k > 0 for k in top_k], torch.bool, device)
        kk = torch.tensor([min(max(k, 1), vocab, k_cand) - 1 for k in top_k], device=device).reshape(-1, 1)
        kth = vals.gather(1, kk)
        fits = _col([min(k, vocab) <= k_cand for k in top_k], torch.bool, device)
        # the K-th candidate tying the k-th: equal scores may continue outside the candidates
        spill = (vals[:, -1:] == kth) & (kth > _NEG_INF) & (k_cand < vocab)
        ok &= ~(has_k & (~fits | spill)).squeeze(1)
        keep &= ~has_k | (vals >= kth)
        open_tail &= ~has_k.squeeze(1)
    if any(p < 1.0 for p in top_p):
        has_p = _col([p < 1.0 for p in top_p], torch.bool, device)
        e = torch.exp((vals - top).double()).masked_fill(~keep, 0.0)
        tail = torch.zeros(n, 1, dtype=torch.float64, device=device)
        if bool(open_tail.any()):
            tail = torch.where(open_tail[:, None], _tail_mass(x, top, ids), tail)
        total = e.sum(dim=-1, keepdim=True) + tail
        weight = ((e * (pos + 1)).sum(dim=-1, keepdim=True) + tail * vocab) / total
        above = e.cumsum(dim=-1) - e  # mass ranked strictly above each candidate
        # 70u * tail: the tail's own float32 exponentials and 64-term partial sums
        gamma = 2 * _U * (weight + 80) + 20 * _U + 70 * _U * tail / (total - above).clamp_min(1e-300)
        mass = (total - above) / total  # the ascending cumulative mass at the candidate's position
        thr = _col([1 - p for p in top_p], torch.float32, device).double()
        kept = mass * (1 - gamma) > thr
        removed = mass * (1 + gamma) < thr
        sure = kept | removed | ~keep
        n_kept = (kept & keep).sum(dim=-1, keepdim=True)
        # transformers always keeps the last sorted position: the top token, if it is unique
        only_top = n_kept == 0
        tie_top = vals[:, :1] == vals[:, 1:2] if k_cand > 1 else torch.zeros_like(only_top)
        last = (n_kept - 1).clamp_min(0)
        nxt = n_kept.clamp_max(k_cand - 1)
        straddle = (vals.gather(1, last) == vals.gather(1, nxt)) & keep.gather(1, nxt) & (n_kept < k_cand) \
            & ~only_top
        reaches_end = (n_kept >= keep.sum(dim=-1, keepdim=True)) & open_tail[:, None]
        bad = ~sure.all(dim=-1, keepdim=True) | (only_top & tie_top) | straddle | reaches_end
        ok &= ~(has_p & bad).squeeze(1)
        keep_p = (pos < n_kept.clamp_min(1)) & keep
        keep = torch.where(has_p, keep_p, keep)
        open_tail &= ~has_p.squeeze(1)
    if any(m > 0.0 for m in min_p):
        has_m = _col([m > 0.0 for m in min_p], torch.bool, device)
        mp = _col(min_p, torch.float32, device).double()
        e = torch.exp(vals - top).double()
        kept = (e > mp * (1 + 16 * _U)) | (pos == 0)
        removed = e < mp * (1 - 16 * _U)
        sure = (kept | removed | ~keep).all(dim=-1, keepdim=True)
        # the tokens outside: all below the last candidate, which must be surely removed
        outside = ~open_tail[:, None] | removed[:, -1:]
        ok &= ~(has_m & ~(sure & outside)).squeeze(1)
        keep = torch.where(has_m, keep & kept, keep)
        open_tail &= ~has_m.squeeze(1)
    ok &= ~open_tail
    return ids, vals, keep, ok


def candidate_filter(x: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float], min_p: Sequence[float],
                     num_candidates: int = 256, growth: int = 16) -> tuple[Candidates, list[int], torch.Tensor]:
    """Transformers' kept set for rows of ``x`` [n, V] that each have a filter, through candidates.

    Returns (rows proven within candidates, the other rows' indices, their masked scores from
    ``reference_filter``). A row not proven with ``num_candidates`` is retried once with ``growth`` times
    as many, then handed to the reference."""
    n, vocab = x.shape
    rows = list(range(n))
    k_cand = min(vocab, num_candidates)
    done_rows, done = [], []
    for attempt in range(2):
        sub = x if len(rows) == n else x[rows]
        ids, vals, keep, ok = _decide(sub, k_cand, [top_k[r] for r in rows], [top_p[r] for r in rows],
                                      [min_p[r] for r in rows])
        ok_list = ok.tolist()
        good = [j for j, g in enumerate(ok_list) if g]
        if good:
            done_rows.extend(rows[j] for j in good)
            sel = torch.tensor(good, device=x.device)
            done.append((ids[sel], vals[sel], keep[sel]))
        rows = [r for r, g in zip(rows, ok_list) if not g]
        if not rows or k_cand == vocab or attempt == 1:
            break
        k_cand = min(vocab, k_cand * growth)
    width = max((d[0].shape[1] for d in done), default=0)

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        fill = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
        return torch.cat([t, fill], dim=1)

    cands = Candidates(
        done_rows,
        torch.cat([pad(d[0], 0) for d in done]) if done else torch.empty(0, 0, dtype=torch.long, device=x.device),
        torch.cat([pad(d[1], _NEG_INF) for d in done]) if done else torch.empty(0, 0, device=x.device),
        torch.cat([pad(d[2], False) for d in done]) if done else torch.empty(0, 0, dtype=torch.bool, device=x.device),
    )
    rest = reference_filter(x[rows], [top_k[r] for r in rows], [top_p[r] for r in rows],
                            [min_p[r] for r in rows]) if rows else x[:0]
    return cands, rows, rest
