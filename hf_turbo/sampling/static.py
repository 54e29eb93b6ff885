"""The sampler on static buffers: no host decision, no allocation outside the step, so a CUDA graph can hold it.

``sample()`` decides on the host which rows take which path (greedy, plain keyed draw, filtered draw) and
copies small per-step lists to the device. A decode step whose rows need no host-side work (no processors:
penalties, bias, EOS suppression, hooks, grammar masks; no logprobs or collected scores) can instead run
:func:`sample_static`: every row of the bucket runs the same ops, its parameters read from
:class:`StaticRowParams` (device buffers filled from pinned host mirrors with one non-blocking copy per
dtype), and the result is the int64 token of each row, on the device.

It gives ``sample()``'s tokens bit for bit: greedy rows take ``argmax`` of the float32 logits as ``sample``
does; sampled rows are scaled by ``scale_by_temperature`` (its device arithmetic, the overflow limit always
applied, a no-op where nothing overflows), filtered with ``reference_filter``'s ops where the step's ``mode``
asks for a filter (a row whose filter is off goes through it unchanged: top-k keeps ``x >= -inf``, top-p
removes nothing when its flag is off, min-p at 0 removes ``p < 0``: nothing), and pick the keyed
``perturbed_argmax`` over the vocabulary, whose token does not depend on the path that proved the kept set
(see ``noise``). Top-k reads its k-th value from a full descending sort instead of ``topk(x, max k)``
(``max k`` is data): the same value. Padding rows are greedy at temperature 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_turbo.backends.mirror import HostMirror
from hf_turbo.sampling.filters import mask_below_kth, mask_min_p, mask_top_p
from hf_turbo.sampling.noise import key_pairs, perturbed_argmax
from hf_turbo.sampling.params import RowState
from hf_turbo.sampling.processors import scale_by_temperature
from hf_turbo.sampling.sampler import needs_processing

__all__ = ["StaticRowParams", "sample_static", "static_mode", "MODE_GREEDY", "MODE_SAMPLE", "MODE_TOP_K",
           "MODE_TOP_P", "MODE_MIN_P"]

MODE_GREEDY = 0  # every row greedy: one argmax
MODE_SAMPLE = 1  # some row draws with keyed noise
MODE_TOP_K, MODE_TOP_P, MODE_MIN_P = 2, 4, 8  # some row has that filter (always with MODE_SAMPLE)


def static_mode(rows: Sequence[RowState]) -> int | None:
    """The step's mode (a bit set of ``MODE_*``) for ``rows``, or None when a row needs host-side work (the
    processors: ``needs_processing``); logprobs and collected scores are the caller's to exclude."""
    if needs_processing(rows):
        return None
    mode = MODE_GREEDY
    for r in rows:
        p = r.params
        if p.greedy:
            continue
        mode |= MODE_SAMPLE | (MODE_TOP_K if p.top_k > 0 else 0) | (MODE_TOP_P if p.top_p < 1.0 else 0) \
            | (MODE_MIN_P if p.min_p > 0.0 else 0)
    return mode


class StaticRowParams:
    """Per-row sampling parameters of up to ``size`` rows in static device buffers.

    float32 ``[temperature | 1 - top_p | min_p]`` and int32 ``[k0 | k1 | top_k index | flags]`` (``size``
    each); flags: bit 0 greedy, bit 1 top-k on, bit 2 top-p on. :meth:`fill` writes a step's rows (and
    neutral padding rows up to the bucket) through pinned host mirrors (two in turn: ``backends/mirror.py``) and
    one non-blocking copy per dtype.
    """

    def __init__(self, size: int, vocab: int, device: torch.device) -> None:
        self.size, self.vocab, self.device = size, vocab, torch.device(device)
        self.f32 = torch.zeros(3 * size, dtype=torch.float32, device=self.device)
        self.i32 = torch.zeros(4 * size, dtype=torch.int32, device=self.device)
        self.host_f32, self.host_i32 = HostMirror(self.f32), HostMirror(self.i32)

    def fill(self, rows: Sequence[RowState], bucket: int) -> None:
        """Write ``rows`` (rows ``len(rows)..bucket`` greedy padding) and copy them to the device."""
        n, s = len(rows), self.size
        if n > bucket or bucket > s:
            raise ValueError(f"{n} rows in a bucket of {bucket} (at most {s})")
        f, i = self.host_f32.begin(), self.host_i32.begin()
        temp, thr, min_p = f[:s], f[s:2 * s], f[2 * s:]
        k0, k1, kidx, flags = i[:s], i[s:2 * s], i[2 * s:3 * s], i[3 * s:]
        params = [r.params for r in rows]
        keys = key_pairs([r.seed for r in rows], [r.position for r in rows])
        temp[:n] = [1.0 if p.greedy else p.temperature for p in params]
        thr[:n] = [1 - p.top_p for p in params]  # 1 - p in float64, then float32: reference_filter's column
        min_p[:n] = [p.min_p for p in params]
        k0[:n] = [k[0] for k in keys]
        k1[:n] = [k[1] for k in keys]
        kidx[:n] = [min(p.top_k, self.vocab) - 1 if p.top_k > 0 else 0 for p in params]
        flags[:n] = [int(p.greedy) | (2 if p.top_k > 0 else 0) | (4 if p.top_p < 1.0 else 0) for p in params]
        temp[n:bucket], thr[n:bucket], min_p[n:bucket] = 1.0, 0.0, 0.0
        k0[n:bucket], k1[n:bucket], kidx[n:bucket], flags[n:bucket] = 0, 0, 0, 1
        self.host_f32.push()
        self.host_i32.push()

    def views(self, bucket: int) -> dict[str, torch.Tensor]:
        """The first ``bucket`` rows' parameters as device views (columns ``[bucket, 1]``, keys ``[bucket, 2]``)."""
        s = self.size
        i = self.i32
        return {"temp": self.f32[:bucket, None], "thr": self.f32[s:s + bucket, None],
                "min_p": self.f32[2 * s:2 * s + bucket, None],
                "keys": torch.stack([i[:bucket], i[s:s + bucket]], dim=1),
                "kidx": i[2 * s:2 * s + bucket, None].long(), "flags": i[3 * s:3 * s + bucket, None]}


def _filter(x: torch.Tensor, v: dict[str, torch.Tensor], mode: int) -> torch.Tensor:
    """``reference_filter``'s ops on every row, each row's own parameters from the static buffers."""
    if mode & MODE_TOP_K:
        x = mask_below_kth(x, torch.sort(x, descending=True).values.gather(1, v["kidx"]), (v["flags"] & 2) != 0)
    if mode & MODE_TOP_P:
        x = mask_top_p(x, v["thr"], (v["flags"] & 4) != 0)
    if mode & MODE_MIN_P:
        x = mask_min_p(x, v["min_p"])
    return x


def sample_static(logits: torch.Tensor, params: StaticRowParams, mode: int) -> torch.Tensor:
    """int64 [B] tokens of the ``B`` rows of ``logits`` (float [B, V]) with the parameters ``params`` holds for
    them; no host sync, no host decision, nothing kept from the call (capturable in a CUDA graph)."""
    scores = logits.float()
    greedy = scores.argmax(dim=-1)
    if not mode & MODE_SAMPLE:
        return greedy
    v = params.views(scores.shape[0])
    x = scale_by_temperature(scores, v["temp"], graph_safe=True)
    if mode & (MODE_TOP_K | MODE_TOP_P | MODE_MIN_P):
        x = _filter(x, v, mode)
    picked = perturbed_argmax(x, v["keys"], reuse=False)
    return torch.where((v["flags"][:, 0] & 1) != 0, greedy, picked)
