"""turbo_equivalence: does an accelerated model produce the same tokens as stock transformers?

An ``evaluate`` metric, loaded from its local path (no hub)::

    import evaluate
    from hf_turbo.eval import METRIC_PATH

    metric = evaluate.load(METRIC_PATH)                      # config "default": token sequences
    metric.compute(predictions=turbo_ids, references=stock_ids,
                   topk_ids=ids, topk_gaps=gaps, near_tie_threshold=1e-4)
    tf = evaluate.load(METRIC_PATH, "teacher_forced")        # per-token log-likelihoods
    tf.compute(predictions=turbo_logprobs, references=stock_logprobs)

Config ``"default"``. ``predictions``: the accelerated run's new token ids per sequence;
``references``: stock ``generate()``'s new token ids per sequence. Optional keyword inputs give
stock's ranking at every decoding step (what the runner takes from stock's scores), per sequence
and per step, best first (k >= 2 entries): ``topk_ids`` (token ids; entry 0 is stock's choice) and
``topk_gaps`` (stock's top score minus each one's score; entry 0 is 0). ``near_tie_threshold``
defaults to 1e-4, the float32 bound. Returns

- ``exact_match``: fraction of sequences identical to the reference;
- ``token_match``: fraction of reference tokens produced before the sequence's first divergence;
- ``first_divergence``: per sequence, index of the first differing token (-1: identical);
- ``divergences``: one dict per diverging sequence: ``row``, ``position``, ``stock_token``,
  ``turbo_token`` (-1 where that sequence had already ended), ``top2_gap`` (stock's top-2 score
  gap there), ``turbo_is_second_choice``, ``turbo_token_gap`` (stock's top score minus its score
  of the accelerated token; None when that token is outside the top k) and ``near_tie``;
- ``num_divergences``, ``num_near_ties``, ``num_unexplained`` and ``all_explained``.

A divergence is a near-tie when stock scored the accelerated token within ``near_tie_threshold``
of its own choice. For a two-way tie that is exactly "the top-2 gap is below the threshold and the
accelerated token is stock's second choice"; it also covers exact ties of three or more tokens
(common in bfloat16), where the accelerated token may rank third. Without ``topk_*`` data no
divergence is a near-tie.

Config ``"teacher_forced"``. ``predictions`` / ``references``: per sequence, the log-likelihood of
each given token under the accelerated / stock forward. Returns ``max_abs_diff``,
``mean_abs_diff`` and ``num_tokens``.

The file imports only ``evaluate`` and ``datasets`` so that ``evaluate.load`` can copy it alone.
"""

from __future__ import annotations

import datasets
import evaluate

_CITATION = ""
_KWARGS_DESCRIPTION = __doc__


def _first_divergence(ref: list[int], pred: list[int]) -> int | None:
    for i, (a, b) in enumerate(zip(ref, pred)):
        if a != b:
            return i
    return None if len(ref) == len(pred) else min(len(ref), len(pred))


class TurboEquivalence(evaluate.Metric):
    """Token exact-match of accelerated vs stock generation, with near-tie analysis."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name == "teacher_forced":
            value = datasets.Value("float64")
        elif self.config_name == "default":
            value = datasets.Value("int64")
        else:
            raise ValueError(f"turbo_equivalence config must be 'default' or 'teacher_forced', "
                             f"got {self.config_name!r}")
        return evaluate.MetricInfo(
            description=__doc__.splitlines()[0],
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(value),
                                        "references": datasets.Sequence(value)}),
        )

    def _compute(self, predictions, references, topk_ids=None, topk_gaps=None,
                 near_tie_threshold: float = 1e-4) -> dict:
        if self.config_name == "teacher_forced":
            return _teacher_forced(predictions, references)
        n = len(references)
        if (topk_ids is None) != (topk_gaps is None):
            raise ValueError("topk_ids and topk_gaps go together: give both or neither")
        for name, value in (("topk_ids", topk_ids), ("topk_gaps", topk_gaps)):
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} rows for {n} references")
        firsts: list[int] = []
        divergences: list[dict] = []
        matched = total = exact = 0
        for row, (ref, pred) in enumerate(zip(references, predictions)):
            ref, pred = list(ref), list(pred)
            pos = _first_divergence(ref, pred)
            total += len(ref)
            if pos is None:
                exact += 1
                matched += len(ref)
                firsts.append(-1)
                continue
            matched += pos
            firsts.append(pos)
            divergences.append(_divergence(row, pos, ref, pred, topk_ids, topk_gaps, near_tie_threshold))
        ties = sum(d["near_tie"] for d in divergences)
        return {
            "num_sequences": n,
            "exact_match": exact / n if n else 1.0,
            "token_match": matched / total if total else 1.0,
            "first_divergence": firsts,
            "divergences": divergences,
            "num_divergences": len(divergences),
            "num_near_ties": ties,
            "num_unexplained": len(divergences) - ties,
            "all_explained": ties == len(divergences),
            "near_tie_threshold": near_tie_threshold,
        }


def _divergence(row: int, pos: int, ref: list[int], pred: list[int], topk_ids, topk_gaps, threshold: float) -> dict:
    """The record of one sequence's first divergence, judged against stock's ranking at that step."""
    turbo_tok = pred[pos] if pos < len(pred) else -1
    ids = list(topk_ids[row][pos]) if topk_ids is not None and pos < len(topk_ids[row]) else None
    gaps = list(topk_gaps[row][pos]) if topk_gaps is not None and pos < len(topk_gaps[row]) else None
    top2_gap = second = turbo_gap = None
    if ids is not None and gaps is not None and len(ids) >= 2:
        top2_gap, second = float(gaps[1]), ids[1] == turbo_tok
        turbo_gap = float(gaps[ids.index(turbo_tok)]) if turbo_tok in ids else None
    return {
        "row": row,
        "position": pos,
        "stock_token": ref[pos] if pos < len(ref) else -1,
        "turbo_token": turbo_tok,
        "top2_gap": top2_gap,
        "turbo_is_second_choice": second,
        "turbo_token_gap": turbo_gap,
        "near_tie": turbo_gap is not None and turbo_tok != -1 and turbo_gap < threshold,
    }


def _teacher_forced(predictions, references) -> dict:
    diffs: list[float] = []
    for row, (pred, ref) in enumerate(zip(predictions, references)):
        if len(pred) != len(ref):
            raise ValueError(f"teacher_forced row {row}: {len(pred)} predicted log-likelihoods for "
                             f"{len(ref)} reference ones")
        diffs.extend(abs(float(p) - float(r)) for p, r in zip(pred, ref))
    return {
        "num_tokens": len(diffs),
        "max_abs_diff": max(diffs) if diffs else 0.0,
        "mean_abs_diff": sum(diffs) / len(diffs) if diffs else 0.0,
    }
