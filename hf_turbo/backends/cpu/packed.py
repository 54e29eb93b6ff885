"""Linear layers on weights packed once for MKL, used where they equal ``F.linear`` bit for bit (CPU, fp32).

``F.linear`` on the CPU is MKL's sgemm, which copies the weight into its internal blocked layout on
every call. For a decode step of a few dozen tokens that copy is a large share of the call: on the
fixture model the 29 linear layers of a 16-token step take ~3.2 ms with ``F.linear`` and ~2.0 ms
with weights packed once (``cblas_sgemm_pack``) so that each step only multiplies
(``cblas_sgemm_compute``, through ``ext.packed_gemm``), with every weight in cache; in a real step, with the
K/V streaming through the caches, the saving is smaller.

Whether the packed product equals the stock one bit for bit depends on MKL's choice of code path,
which depends on the shapes and the token count (on this VM: equal from 11-16 tokens up for the
fixture's shapes, never for 4096 x 4096). So nothing is assumed: :class:`PackedLinear` compares the
packed product with the layer's own ``F.linear`` on random inputs of each token count the first time
that count comes up (once per process, weight shape and thread count), and uses it only for the counts
that matched. Every other call goes through ``F.linear``; a weight that was replaced, changed in place
or given new data (``.data =``, as ``module.to()`` does) since it was packed is packed again first.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from hf_turbo.backends.cpu import ext

__all__ = ["MAX_TOKENS", "PACK_BUDGET_BYTES", "PackedLinear"]

logger = logging.getLogger(__name__)

MAX_TOKENS = 256  # packed only for steps of up to this many tokens: past that the per-call copy is a small share
PACK_BUDGET_BYTES = 256 * 2**20  # the packed copies double the weights' memory; only models this small get them

_verdicts: dict[tuple, bool] = {}  # (shape key, tokens, threads) -> the packed product matched F.linear


def _stamp(t: torch.Tensor | None) -> tuple | None:
    """What changes when a tensor is replaced (id), written in place (version) or given new data (pointer)."""
    return None if t is None else (id(t), t._version, t.data_ptr())


class PackedLinear:
    """``packed(x)`` is ``F.linear(x, linear.weight, linear.bias)``, bitwise, for x [1, T, in_features].

    The product runs on a copy of the weight packed once for MKL where that was checked equal for
    T tokens, and through ``F.linear`` otherwise. ``pack=False`` (or a weight that is not float32 on
    the CPU, or a build without the packed GEMM) leaves only ``F.linear``. ``hits`` counts the calls
    the packed weight served.
    """

    def __init__(self, linear: nn.Linear, pack: bool = True) -> None:
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.hits = 0
        self.packed = None
        if pack:
            self._pack()

    def _pack(self) -> None:
        lin = self.linear
        self.packed = self.bias = None
        self._ok: dict[tuple[int, int], bool] = {}
        self._weight, self._bias = lin.weight, lin.bias  # held, so that their ids in the stamp stay theirs
        self._packed_stamp = (_stamp(lin.weight), _stamp(lin.bias))
        tensors = [t for t in (lin.weight, lin.bias) if t is not None]
        gemm = ext.packed_gemm()
        if gemm is None or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
            return
        pack_weight, self._product = gemm
        with torch.no_grad():
            self.packed = pack_weight(lin.weight.detach().contiguous())
            self.bias = None if lin.bias is None else lin.bias.detach()
        # what the stock call's code path depends on: the shape, the bias, the weight's alignment
        self._key = (self.out_features, self.in_features, lin.bias is not None, lin.weight.data_ptr() % 64)

    def _changed(self) -> bool:
        """The weight or bias was replaced, changed in place or given new data (``module.to()``) since packing."""
        return (_stamp(self.linear.weight), _stamp(self.linear.bias)) != self._packed_stamp

    def _verdict(self, tokens: int, threads: int) -> bool:
        key = (self._key, tokens, threads)
        verdict = _verdicts.get(key)
        if verdict is None:
            with torch.no_grad():
                gen = torch.Generator().manual_seed(tokens)
                x = torch.randn(1, tokens, self.in_features, generator=gen)
                ref = F.linear(x, self.linear.weight, self.linear.bias)
                got = self._product(x, self.packed, self.out_features, self.in_features, self.bias)
                verdict = _verdicts[key] = bool(torch.equal(ref, got))
            logger.debug("packed GEMM %s, %d tokens, %d threads: %s", self._key[:3], tokens, threads,
                         "bitwise F.linear" if verdict else "differs from F.linear, not used")
        self._ok[(tokens, threads)] = verdict
        return verdict

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` for ``x`` [1, T, in_features]."""
        if (self.packed is not None and x.dim() == 3 and x.shape[0] == 1 and 0 < x.shape[1] <= MAX_TOKENS
                and x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous()
                and x.data_ptr() % 64 == 0):
            if self._changed():
                logger.debug("a packed weight changed since it was packed; repacking")
                self._pack()
            threads = torch.get_num_threads()
            ok = self._ok.get((x.shape[1], threads))
            if ok is None and self.packed is not None:
                ok = self._verdict(x.shape[1], threads)
            if ok:
                self.hits += 1
                return self._product(x, self.packed, self.out_features, self.in_features, self.bias)
        return F.linear(x, self.linear.weight, self.linear.bias)
