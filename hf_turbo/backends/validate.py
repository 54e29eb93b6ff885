"""Argument checks shared by the attention entry points (reference and Triton).

Shape, dtype and stride checks read tensor metadata only (no device sync). The value checks
(``check_paged_values``, ``check_varlen_values``) need one GPU->CPU sync; the public functions run
them when ``validate=True`` and the engine's hot loop turns them off.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
KV8_DTYPES = (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)  # an 8-bit cache's values (kv_quant.py)
TRITON_MAX_HEAD_DIM = 256
TRITON_MIN_HEAD_DIM = 16


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _check_index(name: str, t: Tensor, ndim: int) -> None:
    if t.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype} (shape {_shape(t)})")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {_shape(t)}")


def _check_heads(q: Tensor, k_name: str, k: Tensor, same_dtype: bool = True) -> None:
    """q: [T, H_q, D], k: [..., H_kv, D]."""
    if q.dim() != 3:
        raise ValueError(f"q must be [T, H_q, D], got shape {_shape(q)}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be a float tensor, got {q.dtype}")
    if same_dtype and k.dtype != q.dtype:
        raise ValueError(f"q and {k_name} must have the same dtype, got q {q.dtype} and {k_name} {k.dtype}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"head dim mismatch: q shape {_shape(q)} vs {k_name} shape {_shape(k)} (last dims differ)"
        )
    h_q, h_kv = q.shape[1], k.shape[-2]
    if h_kv == 0 or h_q % h_kv != 0:
        raise ValueError(
            f"query heads must be a multiple of kv heads: q shape {_shape(q)} has H_q={h_q}, "
            f"{k_name} shape {_shape(k)} has H_kv={h_kv}"
        )
    if k.device != q.device:
        raise ValueError(f"q and {k_name} must be on the same device, got {q.device} and {k.device}")


def _check_out(out: Tensor | None, q: Tensor) -> None:
    if out is None:
        return
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"out must match q: got out shape {_shape(out)} {out.dtype} on {out.device}, "
            f"q shape {_shape(q)} {q.dtype} on {q.device}"
        )


def _check_options(sliding_window: int | None, softcap: float | None) -> None:
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")


def check_kv_scales(k_cache: Tensor, v_cache: Tensor, k_scale: Tensor | None, v_scale: Tensor | None) -> bool:
    """Whether the caches are 8-bit; then both scales must be float32 [num_blocks, block_size, H_kv], contiguous."""
    if (k_scale is None) != (v_scale is None):
        raise ValueError("k_scale and v_scale go together: pass both or neither")
    if k_cache.dtype not in KV8_DTYPES:
        if k_scale is not None:
            raise ValueError(f"k_scale/v_scale belong to an 8-bit cache (int8, float8_e4m3fn, float8_e5m2); "
                             f"k_cache is {k_cache.dtype}")
        return False
    if k_scale is None:
        raise ValueError(f"an 8-bit k_cache ({k_cache.dtype}) needs k_scale and v_scale")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache and v_cache must share a dtype, got {k_cache.dtype} and {v_cache.dtype}")
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s.shape != k_cache.shape[:3] or s.dtype != torch.float32 or not s.is_contiguous() \
                or s.device != k_cache.device:
            raise ValueError(f"{name} must be a contiguous float32 tensor of shape {list(k_cache.shape[:3])} "
                             f"on {k_cache.device}, got {s.dtype} {_shape(s)} on {s.device}")
    return True


def check_store_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                   k_scale: Tensor | None = None, v_scale: Tensor | None = None) -> None:
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(
            f"key and value must both be [T, H_kv, D], got key {_shape(key)} and value {_shape(value)}"
        )
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, H_kv, D], "
            f"got k_cache {_shape(k_cache)} and v_cache {_shape(v_cache)}"
        )
    if key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"key shape {_shape(key)} does not fit k_cache shape {_shape(k_cache)} in (H_kv, D)")
    if check_kv_scales(k_cache, v_cache, k_scale, v_scale):
        if key.dtype != value.dtype or key.dtype not in FLOAT_DTYPES:
            raise ValueError(f"key and value must share a float dtype, got {key.dtype} and {value.dtype}")
    elif not (key.dtype == value.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(
            f"key, value, k_cache, v_cache must share a dtype, got {key.dtype}, {value.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}"
        )
    _check_index("slot_mapping", slot_mapping, 1)
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(
            f"slot_mapping length {slot_mapping.shape[0]} != number of tokens in key {_shape(key)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"k_cache and v_cache must be contiguous (shape {_shape(k_cache)})")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError(
            f"key and value must be contiguous in the last dim, got strides {key.stride()} and {value.stride()}"
        )


def check_paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cu_seqlens_q: Tensor,
    context_lens: Tensor,
    block_tables: Tensor,
    sliding_window: int | None,
    softcap: float | None,
    out: Tensor | None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> None:
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, H_kv, D], "
            f"got k_cache {_shape(k_cache)} and v_cache {_shape(v_cache)}"
        )
    quantized = check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    _check_heads(q, "k_cache", k_cache, same_dtype=not quantized)
    if not quantized and v_cache.dtype != q.dtype:
        raise ValueError(f"q and v_cache must have the same dtype, got q {q.dtype} and v_cache {v_cache.dtype}")
    _check_index("cu_seqlens_q", cu_seqlens_q, 1)
    _check_index("context_lens", context_lens, 1)
    _check_index("block_tables", block_tables, 2)
    num_seqs = context_lens.shape[0]
    if cu_seqlens_q.shape[0] != num_seqs + 1:
        raise ValueError(
            f"cu_seqlens_q must have num_seqs + 1 = {num_seqs + 1} entries (context_lens shape "
            f"{_shape(context_lens)}), got shape {_shape(cu_seqlens_q)}"
        )
    if block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables must have one row per sequence: shape {_shape(block_tables)} vs context_lens "
            f"shape {_shape(context_lens)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"k_cache and v_cache must be contiguous (shape {_shape(k_cache)})")
    _check_options(sliding_window, softcap)
    _check_out(out, q)


def check_flash_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    causal: bool,
    sliding_window: int | None,
    softcap: float | None,
    out: Tensor | None,
) -> None:
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [T_k, H_kv, D], got k {_shape(k)} and v {_shape(v)}")
    _check_heads(q, "k", k)
    if v.dtype != q.dtype:
        raise ValueError(f"q and v must have the same dtype, got q {q.dtype} and v {v.dtype}")
    _check_index("cu_seqlens_q", cu_seqlens_q, 1)
    _check_index("cu_seqlens_k", cu_seqlens_k, 1)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must both have num_seqs + 1 entries, got shapes "
            f"{_shape(cu_seqlens_q)} and {_shape(cu_seqlens_k)}"
        )
    if cu_seqlens_q.shape[0] < 1:
        raise ValueError("cu_seqlens_q must have num_seqs + 1 >= 1 entries, got shape [0]")
    _check_options(sliding_window, softcap)
    if sliding_window is not None and not causal:
        raise ValueError(f"sliding_window={sliding_window} requires causal=True")
    _check_out(out, q)


def check_triton_inputs(q: Tensor, **others: Tensor | None) -> None:
    """What the Triton kernels cannot take: other dtypes, odd head dims, strided last dims."""
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"Triton kernels take float16, bfloat16 or float32; got q dtype {q.dtype}")
    d = q.shape[-1]
    if not TRITON_MIN_HEAD_DIM <= d <= TRITON_MAX_HEAD_DIM:
        raise ValueError(
            f"head dim {d} (q shape {_shape(q)}) unsupported by the Triton kernels: "
            f"need {TRITON_MIN_HEAD_DIM} <= D <= {TRITON_MAX_HEAD_DIM}"
        )
    for name, t in (("q", q), *others.items()):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(
                f"{name} must be contiguous in the last dim, got shape {_shape(t)} strides {t.stride()}"
            )


def check_paged_values(
    cu_seqlens_q: Tensor, context_lens: Tensor, block_tables: Tensor, num_tokens: int, block_size: int,
    num_blocks: int, max_context_len: int | None = None,
) -> None:
    """Value checks on the metadata with a single device->host sync."""
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    capacity = block_tables.shape[1] * block_size
    bound = capacity if max_context_len is None else min(capacity, max_context_len)
    needed = (context_lens + block_size - 1) // block_size  # [num_seqs]
    cols = torch.arange(block_tables.shape[1], device=block_tables.device)
    used = cols[None, :] < needed[:, None]
    bad_entry = used & ((block_tables < 0) | (block_tables >= num_blocks))
    flags = torch.stack([
        cu_seqlens_q[0] != 0,
        cu_seqlens_q[-1] != num_tokens,
        (q_lens < 1).any(),
        (context_lens < q_lens).any(),
        (context_lens > bound).any(),
        bad_entry.any(),
    ]).tolist()
    if not any(flags):
        return
    cu, ctx = cu_seqlens_q.tolist(), context_lens.tolist()
    if flags[0] or flags[1]:
        raise ValueError(f"cu_seqlens_q must start at 0 and end at the number of tokens {num_tokens}, got {cu}")
    if flags[2]:
        raise ValueError(f"cu_seqlens_q must be strictly increasing (every q_len >= 1), got {cu}")
    if flags[3]:
        raise ValueError(f"context_lens must be >= each sequence's q_len: context_lens {ctx}, cu_seqlens_q {cu}")
    if flags[4] and max(ctx) <= capacity:
        raise ValueError(f"max(context_lens) = {max(ctx)} > max_context_len = {max_context_len}")
    if flags[4]:
        raise ValueError(
            f"block_tables too small: max(context_lens) = {max(ctx)} > block_tables.shape[1] * block_size = "
            f"{block_tables.shape[1]} * {block_size} = {capacity} (block_tables shape {_shape(block_tables)})"
        )
    raise ValueError(
        f"block_tables has block ids outside [0, {num_blocks}) in the blocks used by context_lens "
        f"(block_tables shape {_shape(block_tables)})"
    )


def check_varlen_values(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, num_q: int, num_k: int) -> None:
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    k_lens = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    flags = torch.stack([
        cu_seqlens_q[0] != 0,
        cu_seqlens_q[-1] != num_q,
        cu_seqlens_k[0] != 0,
        cu_seqlens_k[-1] != num_k,
        (q_lens < 0).any() | (k_lens < 0).any(),
        (q_lens > k_lens).any(),
    ]).tolist()
    if not any(flags):
        return
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if flags[0] or flags[1]:
        raise ValueError(f"cu_seqlens_q must start at 0 and end at T_q = {num_q}, got {cq}")
    if flags[2] or flags[3]:
        raise ValueError(f"cu_seqlens_k must start at 0 and end at T_k = {num_k}, got {ck}")
    if flags[4]:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must be non-decreasing, got {cq} and {ck}")
    raise ValueError(f"each sequence needs q_len <= k_len: cu_seqlens_q {cq}, cu_seqlens_k {ck}")
