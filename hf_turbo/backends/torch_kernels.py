"""Pure-torch attention: the CPU execution path and the oracle the Triton kernels are tested against.

Semantics shared with the kernels (see ``hf_turbo.backends.kernels``): query j of a sequence with q_len new
tokens and k_len keys sits at position p = k_len - q_len + j (bottom-right aligned) and attends keys
k <= p, and k > p - W with a sliding window W. Scores are ``scale * q.k``, then ``c * tanh(s / c)``
with a softcap c. Query head h reads KV head h // (H_q // H_kv).

Batch invariance: each sequence's output is computed from that sequence's tensors only, by a code
path chosen from that sequence's own q_len and context length, so a sequence gives bitwise the
same output alone or inside any batch. Decode sequences (q_len == 1, no softcap) with the same key
range are batched into one unmasked ``scaled_dot_product_attention`` call (no padding: SDPA computes
each (batch, head) item independently). Everything else runs one SDPA call per sequence (one manual softmax per sequence
with a softcap).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["causal_mask", "flash_attention_varlen_ref", "gather_keys", "paged_attention_ref", "plan_paged",
           "sequence_attention_ref", "store_kv_ref"]

# Score elements per chunk in the manual (softcap) path: bounds memory for long prefills.
_SOFTCAP_CHUNK_ELEMS = 1 << 24
# Masks up to this many elements are cached (an LRU of 128: at most 64 MiB in float32).
_MASK_CACHE_ELEMS = 1 << 17


def store_kv_ref(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """k_cache.view(-1, H_kv, D)[slot] = key (and likewise for value); slot -1 is skipped."""
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    h, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, h, d)[slots] = key
    v_cache.view(-1, h, d)[slots] = value


def _fold_group(q: Tensor, h_kv: int) -> Tensor:
    """[Lq, H_q, D] -> [H_kv, g * Lq, D]: queries sharing a KV head become rows of one matrix."""
    lq, h_q, d = q.shape
    return q.view(lq, h_kv, h_q // h_kv, d).permute(1, 2, 0, 3).reshape(h_kv, -1, d)


def _unfold_group(o: Tensor, lq: int) -> Tensor:
    """[H_kv, g * Lq, D] -> [Lq, H_q, D]."""
    h_kv, _, d = o.shape
    return o.view(h_kv, -1, lq, d).permute(2, 0, 1, 3).reshape(lq, -1, d)


def _softcap_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, softcap: float) -> Tensor:
    """Manual softmax(c * tanh(scale * q k^T / c)) v. q: [Lq, H_q, D]; k, v: [Lk, H_kv, D]."""
    lq, lk, h_kv = q.shape[0], k.shape[0], k.shape[1]
    ct = torch.promote_types(q.dtype, torch.float32)
    qf = _fold_group(q, h_kv).to(ct)  # [H_kv, g*Lq, D]
    kt = k.transpose(0, 1).to(ct).transpose(1, 2)  # [H_kv, D, Lk]
    vf = v.transpose(0, 1).to(ct)  # [H_kv, Lk, D]
    rows = qf.shape[1]
    if mask is not None:
        mask = mask.repeat(rows // lq, 1)  # [g*Lq, Lk]
    out = torch.empty_like(qf)
    chunk = max(1, _SOFTCAP_CHUNK_ELEMS // max(1, h_kv * lk))
    for r0 in range(0, rows, chunk):
        s = torch.matmul(qf[:, r0 : r0 + chunk], kt) * scale
        s = softcap * torch.tanh(s / softcap)
        if mask is not None:
            s = s.masked_fill(~mask[r0 : r0 + chunk], float("-inf"))
        out[:, r0 : r0 + chunk] = torch.matmul(torch.softmax(s, dim=-1), vf)
    return _unfold_group(out, lq).to(q.dtype)


def causal_mask(lq: int, lk: int, offset: int, sliding_window: int | None, device) -> Tensor:
    """[Lq, Lk] bool, True = attend: query j sits at key position offset + j."""
    qp = torch.arange(offset, offset + lq, device=device)[:, None]
    kp = torch.arange(lk, device=device)[None, :]
    mask = kp <= qp
    if sliding_window is not None:
        mask &= kp > qp - sliding_window
    return mask


@functools.lru_cache(maxsize=128)
def _additivecausal_mask(lq: int, lk: int, offset: int, sliding_window: int | None, groups: int, dtype: torch.dtype,
                          device) -> Tensor:
    """``_causal_mask`` repeated for the ``groups`` query heads of a KV head, as the 0 / -inf float mask
    that SDPA makes of a bool one (``where(mask, 0, -inf)``): passing it gives the same bits."""
    mask = causal_mask(lq, lk, offset, sliding_window, device).repeat(groups, 1)
    bias = torch.zeros(mask.shape, dtype=dtype, device=device)
    return bias.masked_fill_(~mask, float("-inf"))


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos0: int,
    k_pos0: int,
    *,
    scale: float,
    causal: bool,
    sliding_window: int | None,
    softcap: float | None,
) -> Tensor:
    """One sequence. q: [Lq, H_q, D] at positions q_pos0 + j; k, v: [Lk, H_kv, D] at k_pos0 + i.

    Returns [Lq, H_q, D] in q's dtype.
    """
    lq, h_q, _ = q.shape
    lk, h_kv = k.shape[0], k.shape[1]
    mask = None  # [Lq, Lk] bool, True = attend
    is_causal = False
    if causal:
        q_last = q_pos0 + lq - 1
        all_visible = k_pos0 + lk - 1 <= q_pos0 and (sliding_window is None or k_pos0 > q_last - sliding_window)
        if not all_visible:
            if sliding_window is None and softcap is None and lq == lk and q_pos0 == k_pos0:
                is_causal = True
            elif softcap is None and (h_q // h_kv) * lq * lk <= _MASK_CACHE_ELEMS:
                # small windows (speculative verification, short chunks after cached prefixes) recur in
                # every layer of a step: the additive mask SDPA would derive from a bool mask, made once
                bias = _additivecausal_mask(lq, lk, q_pos0 - k_pos0, sliding_window, h_q // h_kv, q.dtype, q.device)
                o = F.scaled_dot_product_attention(_fold_group(q, h_kv)[None], k.transpose(0, 1)[None],
                                                   v.transpose(0, 1)[None], attn_mask=bias, scale=scale)
                return _unfold_group(o[0], lq)
            else:
                mask = causal_mask(lq, lk, q_pos0 - k_pos0, sliding_window, q.device)
    if softcap is not None:
        return _softcap_attention(q, k, v, mask, scale, softcap)
    if is_causal:
        g = h_q // h_kv
        if g > 1:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True, scale=scale
        )  # [1, H_q, Lq, D]
        return o[0].transpose(0, 1)
    if mask is not None:
        mask = mask.repeat(h_q // h_kv, 1)  # [g*Lq, Lk]
    o = F.scaled_dot_product_attention(
        _fold_group(q, h_kv)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask, scale=scale
    )  # [1, H_kv, g*Lq, D]
    return _unfold_group(o[0], lq)


def gather_keys(cache: Tensor, table_row: Tensor, start: int, end: int) -> Tensor:
    """Keys at positions [start, end) of one sequence from its blocks -> [end - start, H_kv, D]."""
    bs = cache.shape[1]
    b0, b1 = start // bs, -(-end // bs)
    blocks = cache[table_row[b0:b1].long()]  # [b1 - b0, bs, H_kv, D]
    return blocks.flatten(0, 1)[start - b0 * bs : end - b0 * bs]


def _decode_plan(
    decode: list[tuple[int, int, int, int]], block_tables: Tensor, block_size: int, device: torch.device
) -> list[tuple[Tensor, int, int, Tensor, int]]:
    """Group q_len == 1 sequences by their exact (first key, number of keys); per group:
    (block ids [nb, nblk], offset of the first key in the first block, number of keys, q rows [nb], nb).

    Equal lengths need no padding and no mask, so a group is one unmasked SDPA call whose items
    are computed independently: a sequence's result is the same in any group. Depends only on the
    forward's metadata, so one plan serves every layer of a forward.
    """
    groups: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for item in decode:
        groups.setdefault((item[1] % block_size, item[2]), []).append(item)
    plan = []
    for (offset, n_keys), members in groups.items():
        nblk = -(-(offset + n_keys) // block_size)
        sel = torch.tensor([m[0] for m in members], device=device)
        b0 = torch.tensor([m[1] // block_size for m in members], device=device)
        idx = b0[:, None] + torch.arange(nblk, device=device)[None, :]
        blocks = block_tables[sel].long().gather(1, idx)  # [nb, nblk]
        rows = torch.tensor([m[3] for m in members], device=device)
        plan.append((blocks, offset, n_keys, rows, len(members)))
    return plan


def _decode_grouped(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    plan: list[tuple[Tensor, int, int, Tensor, int]],
    scale: float,
    out: Tensor,
) -> None:
    """q_len == 1 sequences: one unmasked SDPA call per group of equal key ranges (see _decode_plan)."""
    _, _, h_kv, d = k_cache.shape
    h_q = q.shape[1]
    for blocks, offset, n_keys, rows, nb in plan:
        flat = blocks.view(-1)  # whole blocks via index_select: 3x faster than a per-token gather on CPU
        kb = k_cache.index_select(0, flat).view(nb, -1, h_kv, d)[:, offset:offset + n_keys].transpose(1, 2)
        vb = v_cache.index_select(0, flat).view(nb, -1, h_kv, d)[:, offset:offset + n_keys].transpose(1, 2)
        qb = q[rows].view(nb, h_kv, h_q // h_kv, d)
        o = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)  # [nb, H_kv, g, D]
        out[rows] = o.reshape(nb, h_q, d)


def paged_attention_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cu_seqlens_q: Tensor,
    context_lens: Tensor,
    block_tables: Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    out: Tensor | None = None,
    plans: dict | None = None,
) -> Tensor:
    """Causal attention of packed queries over a paged KV cache. q: [T, H_q, D] -> [T, H_q, D].

    ``plans``: per (sliding window, no softcap) the forward's :func:`plan_paged` metadata, shared by every
    layer of one forward (the reference backend makes them before the forward); a missing one is made here.

    Per-sequence path: q_len == 1 without softcap -> SDPA grouped by equal key range; otherwise one SDPA call
    (or manual softmax with softcap) on that sequence's keys gathered from its blocks. With a
    sliding window only the keys inside the window are gathered.
    """
    out = torch.empty_like(q) if out is None else out
    if q.shape[0] == 0:
        return out
    key = (sliding_window, softcap is None)
    entry = plans.get(key) if plans is not None else None
    if entry is None:
        entry = plan_paged(cu_seqlens_q.tolist(), context_lens.tolist(), block_tables, k_cache.shape[1],
                           sliding_window, softcap)
        if plans is not None:
            plans[key] = entry
    cu, ctx, plan = entry
    for s, length in enumerate(ctx):
        q0, q1 = cu[s], cu[s + 1]
        if q1 == q0 or (q1 - q0 == 1 and softcap is None):
            continue
        q_pos0 = length - (q1 - q0)
        start = max(0, q_pos0 - sliding_window + 1) if sliding_window is not None else 0
        k = gather_keys(k_cache, block_tables[s], start, length)
        v = gather_keys(v_cache, block_tables[s], start, length)
        out[q0:q1] = _attend(
            q[q0:q1], k, v, q_pos0, start, scale=scale, causal=True, sliding_window=sliding_window, softcap=softcap
        )
    if plan:
        _decode_grouped(q, k_cache, v_cache, plan, scale, out)
    return out


def plan_paged(cu: list[int], context_lens: list[int], block_tables: Tensor, block_size: int,
               sliding_window: int | None, softcap: float | None) -> tuple[list[int], list[int], list]:
    """``paged_attention_ref``'s metadata for one forward and one (window, softcap?) kind of layer: the host
    lists and the grouping of its single-query sequences (``_decode_plan``); the same for every such layer."""
    decode: list[tuple[int, int, int, int]] = []  # (seq, first key, number of keys, q row)
    if softcap is None:
        for s, length in enumerate(context_lens):
            q0, q1 = cu[s], cu[s + 1]
            if q1 - q0 == 1:
                start = max(0, length - sliding_window) if sliding_window is not None else 0
                decode.append((s, start, length - start, q0))
    plan = _decode_plan(decode, block_tables, block_size, block_tables.device) if decode else []
    return cu, context_lens, plan


def sequence_attention_ref(
    q: Tensor,
    q_starts: list[int],
    context_lens: list[int],
    keys: Tensor | list[Tensor],
    values: Tensor | list[Tensor],
    *,
    scale: float,
    slots: list[int] | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    out: Tensor | None = None,
    skip_decode: bool = False,
) -> Tensor:
    """``paged_attention_ref`` with each sequence's keys already contiguous (no block tables, no gather).

    q: [T, H_q, D]; sequence s owns rows ``q_starts[s]:q_starts[s + 1]`` and attends positions
    ``[0, context_lens[s])``, head-major: either ``keys[s]`` / ``values[s]`` ([H_kv, >= context_lens[s], D],
    views are fine), or, with ``slots``, row ``slots[s]`` of arenas ``keys`` / ``values``
    ([num_slots, H_kv, capacity, D], see ``backends/cpu/rows.py``). The same per-sequence SDPA calls as
    ``paged_attention_ref`` on the same values, so the same bits (the CPU kernel's result does not depend
    on the keys' strides). With ``skip_decode`` (needs ``out``), sequences with one query row are left
    as they are in ``out``: the caller computed them (``backends/cpu``).
    """
    out_given = out
    t, h_q, d = q.shape
    h_kv = keys.shape[1] if slots is not None else (keys[0].shape[0] if len(keys) else 1)
    q_groups = q.view(t, h_kv, h_q // h_kv, d)  # decode rows: queries sharing a KV head as rows of one matrix
    if slots is not None:
        k_strides, v_strides = keys.stride(), values.stride()
        k_base, v_base = keys.storage_offset(), values.storage_offset()
        if out is None and softcap is None and sliding_window is None and q_starts == list(range(t + 1)):
            # a pure decode step over arena rows: the same calls as the loop below, with less Python per call
            sdpa, qs = F.scaled_dot_product_attention, q_groups.unsqueeze(1).unbind(0)  # t x [1, H_kv, g, D]
            outs = [sdpa(qs[s], keys.as_strided((1, h_kv, n, d), k_strides, k_base + r * k_strides[0]),
                         values.as_strided((1, h_kv, n, d), v_strides, v_base + r * v_strides[0]), scale=scale)
                    for s, (n, r) in enumerate(zip(context_lens, slots, strict=True))]
            return (outs[0] if t == 1 else torch.cat(outs)).view(t, h_q, d)
    rows: list[int] = []  # decode rows: outputs written by one index_copy_ at the end
    outs: list[Tensor] = []
    for s, length in enumerate(context_lens):
        q0, q1 = q_starts[s], q_starts[s + 1]
        if q1 == q0 or (skip_decode and q1 - q0 == 1):
            continue
        q_pos0 = length - (q1 - q0)
        start = max(0, q_pos0 - sliding_window + 1) if sliding_window is not None else 0
        if slots is None:
            k, v = keys[s][None, :, start:length], values[s][None, :, start:length]
        else:  # [1, H_kv, L, D] views of row slots[s] (as_strided: the cheapest way to make them)
            shape, r = (1, h_kv, length - start, d), slots[s]
            k = keys.as_strided(shape, k_strides, k_base + r * k_strides[0] + start * k_strides[2])
            v = values.as_strided(shape, v_strides, v_base + r * v_strides[0] + start * v_strides[2])
        if q1 - q0 == 1 and softcap is None:
            outs.append(F.scaled_dot_product_attention(q_groups[q0 : q0 + 1], k, v, scale=scale))  # [1, H_kv, g, D]
            rows.append(q0)
            continue
        if out is None:
            out = torch.empty_like(q)
        out[q0:q1] = _attend(
            q[q0:q1], k[0].transpose(0, 1), v[0].transpose(0, 1), q_pos0, start, scale=scale, causal=True,
            sliding_window=sliding_window, softcap=softcap
        )
    if len(rows) == t and out_given is None:  # a pure decode step: the outputs are all rows, in order
        return (outs[0] if t == 1 else torch.cat(outs)).view(t, h_q, d)
    if out is None:
        out = torch.empty_like(q)
    if rows:
        out.index_copy_(0, torch.tensor(rows, device=q.device), torch.cat(outs).view(len(rows), h_q, d))
    return out


def flash_attention_varlen_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Attention over contiguous packed sequences, one SDPA call per sequence.

    q: [T_q, H_q, D], k/v: [T_k, H_kv, D] -> [T_q, H_q, D]; causal is bottom-right aligned.
    """
    out = torch.empty_like(q) if out is None else out
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[s], cq[s + 1], ck[s], ck[s + 1]
        if q1 == q0:
            continue
        q_pos0 = (k1 - k0) - (q1 - q0)
        start = max(0, q_pos0 - sliding_window + 1) if (causal and sliding_window is not None) else 0
        out[q0:q1] = _attend(
            q[q0:q1],
            k[k0 + start : k1],
            v[k0 + start : k1],
            q_pos0,
            start,
            scale=scale,
            causal=causal,
            sliding_window=sliding_window,
            softcap=softcap,
        )
    return out
