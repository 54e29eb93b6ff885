"""Keyed noise: Gumbel noise as a pure function of (seed, position, token id), on any device.

A sampled token is ``argmax_i(x_i - max(x) + G_i)`` over the kept tokens, ``x`` the scaled scores and
``G_i = -log(-log U_i)`` (the Gumbel-max trick, the exponential race ``argmax p_i / E_i`` in log space),
so its distribution is ``softmax(x)``. ``U_i`` comes from a counter-based hash, not a stream:

* per row, ``(seed, position)`` goes through splitmix64 on the host into two 32-bit keys ``k0, k1``;
* per token ``t``, the 32-bit mix ``h = f(t * 0x9E3779B9 + k0, k1)`` (two multiply-xorshift rounds of
  Wellons' lowbias32, with ``k1`` xored in between) runs as int32 tensor ops on the logits' device,
  for every row at once (multiplication wraps modulo 2**32 on CPU and CUDA alike);
* ``U = (h >> 9 + 0.5) / 2**23``: 23 bits, exactly representable in float32, never 0 or 1 (24 bits
  would round the largest value up to 1.0, whose Gumbel noise is +inf).

The same key gives the same bits on every device; what may differ between devices is the last ulp
of the two float32 logarithms, so the same seed may pick a different token on CPU and CUDA only where
two candidates' ``x + G`` are within an ulp. The 23-bit uniform makes each token's noise a 2**23-level
quantile of the exact Gumbel distribution: the sampled distribution is softmax's up to that quantization.
Only the tokens a row can pick need noise: a top-k/top-p row hashes its candidates, not the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hf_turbo.sampling.workspace import on_device, scratch

__all__ = ["row_keys", "key_pairs", "keyed_bits", "keyed_gumbel", "keyed_uniform", "perturbed_argmax"]

_MASK64 = (1 << 64) - 1
_GOLDEN32 = 0x9E3779B9
_M1 = 0x21F0AAAD
_M2 = 0x735A2D97


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _signed32(x: int) -> int:
    return x - (1 << 32) if x >= 1 << 31 else x


def key_pairs(seeds: Sequence[int], positions: Sequence[int]) -> list[tuple[int, int]]:
    """The two signed 32-bit keys ``(k0, k1)`` of each row ``(seeds[i], positions[i])``, on the host."""
    keys = []
    for seed, pos in zip(seeds, positions):
        z = _splitmix64(_splitmix64(seed & _MASK64) ^ (pos & _MASK64))
        keys.append((_signed32(z & 0xFFFFFFFF), _signed32(z >> 32)))
    return keys


def row_keys(seeds: Sequence[int], positions: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """int32 ``[N, 2]`` keys of the rows ``(seeds[i], positions[i])``: one host-to-device copy."""
    return on_device(key_pairs(seeds, positions), torch.int32, device).reshape(-1, 2)


def _mix_shift(x: torch.Tensor, tmp: torch.Tensor, s: int) -> torch.Tensor:
    """``x ^= x >>> s`` in place (logical shift: torch's ``>>`` on int32 is arithmetic)."""
    torch.bitwise_right_shift(x, s, out=tmp).bitwise_and_((1 << (32 - s)) - 1)
    return x.bitwise_xor_(tmp)


def keyed_bits(keys: torch.Tensor, tokens: torch.Tensor, out: torch.Tensor | None = None,
               tmp: torch.Tensor | None = None) -> torch.Tensor:
    """The 32 hash bits (int32 [N, M]) of ``tokens`` ([N, M] or [M], broadcast over rows) under ``keys``
    [N, 2]; ``out`` and ``tmp``: int32 buffers of that shape (allocated when None)."""
    start = tokens.to(torch.int32).mul(_signed32(_GOLDEN32))
    x = torch.add(start, keys[:, 0:1]) if out is None else torch.add(start, keys[:, 0:1], out=out)
    tmp = torch.empty_like(x) if tmp is None else tmp
    _mix_shift(x, tmp, 16).mul_(_signed32(_M1))
    _mix_shift(x, tmp, 15).bitwise_xor_(keys[:, 1:2]).mul_(_signed32(_M2))
    return _mix_shift(x, tmp, 15)


def _gumbel_from_bits(bits: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Gumbel noise in the memory of ``bits`` (int32, consumed) through ``tmp``; float32 view of ``bits``."""
    torch.bitwise_right_shift(bits, 9, out=tmp).bitwise_and_(0x7FFFFF)
    noise = bits.view(torch.float32)
    noise.copy_(tmp)  # 23-bit integers: exact in float32
    return noise.add_(0.5).mul_(2.0 ** -23).log_().neg_().log_().neg_()


def keyed_uniform(keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in (0, 1), 23 bits each, for ``tokens`` under ``keys`` (see ``keyed_bits``)."""
    bits = keyed_bits(keys, tokens)
    top = torch.bitwise_right_shift(bits, 9).bitwise_and_(0x7FFFFF)
    return top.to(torch.float32).add_(0.5).mul_(2.0 ** -23)


def keyed_gumbel(keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """float32 Gumbel noise ``-log(-log U)`` for ``tokens`` under ``keys``."""
    bits = keyed_bits(keys, tokens)
    return _gumbel_from_bits(bits, torch.empty_like(bits))


def perturbed_argmax(values: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor | None = None,
                     reuse: bool = True) -> torch.Tensor:
    """Per row, the token of ``argmax((values - max) + G)`` (ties: the smaller token id). ``ids`` [n, K]: the
    tokens of ``values``' columns; None: the columns are the vocabulary (computed in reused scratch
    buffers; ``reuse=False``: in fresh ones, as a CUDA graph capture needs). Subtracting the row's maximum
    first keeps the noise from vanishing below the ulp of large scores (``4e30 + G == 4e30``); the
    same operations on the same values give the same token either way."""
    top = values.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    if ids is not None:
        score = ((values - top) + keyed_gumbel(keys, ids)).masked_fill_(values == -math.inf, -math.inf)
        best = score.amax(dim=-1, keepdim=True)
        return torch.where(score == best, ids, torch.iinfo(torch.long).max).amin(dim=-1)
    n, vocab = values.shape
    vocab_ids = torch.arange(vocab, dtype=torch.int32, device=values.device)
    if reuse:
        out, tmp = (scratch(name, (n, vocab), torch.int32, values.device) for name in ("noise", "noise_tmp"))
    else:
        out, tmp = (torch.empty((n, vocab), dtype=torch.int32, device=values.device) for _ in range(2))
    bits = keyed_bits(keys, vocab_ids, out=out, tmp=tmp)
    noise = _gumbel_from_bits(bits, tmp)
    shifted = torch.sub(values, top, out=tmp.view(torch.float32))  # tmp is free again
    return shifted.add_(noise).argmax(dim=-1)  # argmax: the first maximum
