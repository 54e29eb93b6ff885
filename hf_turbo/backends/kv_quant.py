"""8-bit KV cache: the quantization every backend stores and the dequantization attention applies.

Per (token, KV head) a float32 scale ``s = amax / QMAX`` (``amax`` = max |x| over the head's D values; 1/QMAX
for an all-zero vector) and 8-bit values ``q = round(x / s)`` (int8, QMAX 127, round half to even) or
``q = fp8(x / s)`` (``float8_e4m3fn`` QMAX 448, ``float8_e5m2`` QMAX 57344, round to nearest even);
attention reads ``q * s`` (one float32 multiply, then the model's dtype). The Triton store kernel uses the
same operations in the same order (``div_rn``, round-half-even by the 1.5 * 2^23 trick), so it writes the
same bits as :func:`quantize_kv`.

Why per (token, head) and not per (block, head):

* a token's stored bits depend on that token's K/V alone, so the cache is exact with respect to itself:
  chunked prefill, prefix-cache hits, preemption and speculation write every token the same way. A
  per-block scale is not known until the block is full; a block filled over several steps would have to
  be requantized (double rounding that depends on how it was filled) or clip later tokens.
* accuracy (measured, ``benchmarks/bench_kv_quant.py --parts scales``: the trained fixture, float32, head_dim
  64, teacher-forced over 8 x 200 tokens of stdlib source, block size 16, each block quantized once whole, the
  best case for per-block): mean / max |delta log p| per token against the float32 cache, per (token, head)
  against per (block, head): int8 6.9e-3 / 7.3e-2 against 9.8e-3 / 1.2e-1; fp8_e4m3 2.8e-2 / 2.7e-1
  against 3.3e-2 / 5.4e-1; fp8_e5m2 5.6e-2 / 5.8e-1 against 6.2e-2 / 7.3e-1.
* cost: the scales take 4 bytes per (token, head) against 4 per (block, head): with D = 64,
  68 bytes per token and head against 64.25, i.e. 3.76x (against 3.98x) the tokens of a float32 cache and
  1.88x (1.99x) of bfloat16 in the same bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hf_turbo.config import KV_DTYPES

__all__ = ["KV_QUANT", "SCALE_DTYPE", "compact_tables", "dequantize_blocks", "dequantize_kv", "kv_bytes_per_token_head",
           "kv_dtype_of", "quantize_kv", "storage_dtype", "store_kv_quant", "write_quantized"]

# kv_dtype -> (storage dtype, QMAX)
KV_QUANT: dict[str, tuple[torch.dtype, float]] = {
    "int8": (torch.int8, 127.0),
    "fp8_e4m3": (torch.float8_e4m3fn, 448.0),
    "fp8_e5m2": (torch.float8_e5m2, 57344.0),
}
SCALE_DTYPE = torch.float32


def storage_dtype(kv_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the pools hold for ``kv_dtype`` ("auto": the model's)."""
    if kv_dtype == "auto":
        return model_dtype
    if kv_dtype not in KV_QUANT:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    return KV_QUANT[kv_dtype][0]


def kv_dtype_of(pool: Tensor) -> str:
    """The ``kv_dtype`` name of an 8-bit pool's dtype (ValueError for any other dtype)."""
    for name, (dtype, _) in KV_QUANT.items():
        if pool.dtype == dtype:
            return name
    raise ValueError(f"an 8-bit KV pool must be int8, float8_e4m3fn or float8_e5m2, got {pool.dtype}")


def kv_bytes_per_token_head(kv_dtype: str, head_dim: int, model_dtype: torch.dtype) -> int:
    """Bytes one token's K (or V) takes in one KV head: its values plus, when quantized, its scale."""
    values = head_dim * torch.empty((), dtype=storage_dtype(kv_dtype, model_dtype)).element_size()
    return values + (torch.empty((), dtype=SCALE_DTYPE).element_size() if kv_dtype != "auto" else 0)


def quantize_kv(x: Tensor, kv_dtype: str) -> tuple[Tensor, Tensor]:
    """x [..., D] (any float dtype) -> (values [..., D] in the storage dtype, scales [...] float32)."""
    dtype, qmax = KV_QUANT[kv_dtype]
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax, qmax) / qmax
    y = xf / scale.unsqueeze(-1)
    if dtype == torch.int8:
        q = y.round_().clamp_(-qmax, qmax).to(dtype)
    else:  # the fp8 casts do not saturate: clamp first (only rounding can push |y| past QMAX)
        q = y.clamp_(-qmax, qmax).to(dtype)
    return q, scale


def dequantize_kv(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """values [..., D] and scales [...] -> ``q * s`` in ``dtype``."""
    return (q.to(torch.float32) * scale.unsqueeze(-1)).to(dtype)


def write_quantized(pool: Tensor, scales: Tensor, slots: Tensor, src: Tensor, kv_dtype: str) -> None:
    """Quantize ``src`` [T, H, D] into ``pool`` [N, bs, H, D] and ``scales`` [N, bs, H] at ``slots`` [T] (int64,
    all valid). Through byte views: ``index_copy_`` has no fp8 kernel on the CPU."""
    q, scale = quantize_kv(src, kv_dtype)
    h, d = pool.shape[2], pool.shape[3]
    pool.view(torch.uint8).view(-1, h, d).index_copy_(0, slots, q.view(torch.uint8))
    scales.view(-1, h).index_copy_(0, slots, scale)


def store_kv_quant(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, k_scale: Tensor, v_scale: Tensor,
                   slot_mapping: Tensor) -> None:
    """``store_kv`` into an 8-bit cache: key/value [T, H_kv, D] quantized per (token, head); slot -1 is skipped."""
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    kv_dtype = kv_dtype_of(k_cache)
    write_quantized(k_cache, k_scale, slots, key, kv_dtype)
    write_quantized(v_cache, v_scale, slots, value, kv_dtype)


def compact_tables(block_tables: Tensor, context_lens: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """The blocks one forward reads and its block tables renumbered into them.

    Returns (``used`` [U] int64: the distinct block ids within every sequence's context, ascending;
    ``tables`` like ``block_tables`` with entry e replaced by its index in ``used``; entries past a
    sequence's blocks point at some valid index and are never read).
    """
    nblk = (context_lens.long() + block_size - 1) // block_size  # [S]
    width = block_tables.shape[1]
    valid = torch.arange(width, device=block_tables.device)[None, :] < nblk[:, None]
    used = torch.unique(block_tables[valid].long())
    if used.numel() == 0:
        return used, torch.zeros_like(block_tables)
    tables = torch.searchsorted(used, block_tables.long()).clamp_(max=used.numel() - 1).to(block_tables.dtype)
    return used, tables


def dequantize_blocks(pool: Tensor, scales: Tensor, used: Tensor, dtype: torch.dtype) -> Tensor:
    """Blocks ``used`` of an 8-bit pool [N, bs, H, D] (scales [N, bs, H]) as a float pool [U, bs, H, D]."""
    return dequantize_kv(pool.index_select(0, used), scales.index_select(0, used), dtype)
