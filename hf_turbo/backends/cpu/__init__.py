"""The CPU backend: everything that makes the CPU engine fast while staying bitwise the reference.

* every running sequence's K/V also kept contiguous and head-major in a row of per-layer arenas
  (``rows.py``, with shared prefix pages through ``vmem.py``), appended when the pools are written, so
  attention reads views instead of gathering blocks every layer of every step;
* the C++ ops (``csrc/``, loaded and checked by ``ext.py``): a step's single-query sequences attended in
  one call, the K/V writes as one byte copy, and the rotary embedding, RMSNorm and ``silu(gate) * up``
  of a lean forward in one call each;
* projections on weights packed once for MKL (``packed.py``), where the packed product equals ``F.linear``.

Without a compiler the ops fall back to torch's one by one and the rows stay. Nothing else imports this
package: delete it and the CPU engine runs on the reference backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.activations import SiLUActivation

from hf_turbo.backends.base import STOCK_OPS, FusedOps, is_plain_linear
from hf_turbo.backends.cpu import ext, packed
from hf_turbo.backends.cpu.plan import MirrorPlan
from hf_turbo.backends.cpu.rows import ContiguousKV
from hf_turbo.backends.reference import ReferenceBackend
from hf_turbo.backends.torch_kernels import sequence_attention_ref

__all__ = ["CpuBackend", "ContiguousKV"]

_SILU = (nn.SiLU, SiLUActivation)  # act_fn modules whose forward is F.silu
_ONE_CHUNK = 32768  # at::internal::GRAIN_SIZE: smaller elementwise ops never split between threads


@dataclass
class CpuStep:
    """One forward's CPU metadata, made by ``prepare``: where each sequence's row is and which rows are new
    (``plan``), the single-query sequences for the one-call decode attention (``decode``: all of them?,
    their query rows, slots, lengths), and per layer the arenas once ``write_kv`` has appended to them."""

    plan: MirrorPlan
    decode: tuple[bool, Tensor, Tensor, Tensor] | None
    arenas: list[tuple[Tensor, Tensor] | None] = field(default_factory=list)


class CpuBackend(ReferenceBackend):
    """The reference backend's results, bit for bit, through the contiguous rows and the C++ ops."""

    name = "cpu"

    def __init__(self) -> None:
        # build (once per machine) and check the C++ ops now, not inside the first (timed) step
        self._decode = ext.decode_attention()
        self._scatter = ext.scatter_kv()
        # plain dicts (the engine holds its model anyway): a WeakKeyDictionary lookup per projection per step
        # cost ~1% of a small decode step
        self._ops: dict[nn.Module, dict[bool, FusedOps]] = {}  # model -> {one thread?: FusedOps}
        self.linears: dict[nn.Module, packed.PackedLinear] = {}  # nn.Linear -> its PackedLinear

    def new_cache_state(self, cache) -> ContiguousKV:
        if getattr(cache, "quantized", False):  # the selector never pairs them (hf_turbo.backends.resolve_backend)
            raise ValueError(f"the CPU backend does not take an 8-bit KV cache (kv_dtype={cache.kv_dtype!r}); "
                             "use the reference backend")
        return ContiguousKV(cache.num_layers, cache.block_size, cache.num_blocks)

    def prepare(self, ctx) -> None:
        if ctx.seqs is None:  # a forward outside the engine's sequences (a check on a scratch cache): the pools
            super().prepare(ctx)
            return
        cu, lens = ctx.host_cu_seqlens_q, ctx.host_context_lens
        plan = ctx.cache.backend_state.plan(ctx.seqs, lens, cu, [seq.block_ids for seq in ctx.seqs])
        decode = None
        if self._decode is not None and ctx.cache.dtype == torch.float32:
            picked = [s for s in range(len(lens)) if cu[s + 1] - cu[s] == 1]
            decode = (len(picked) == len(lens), torch.tensor([cu[s] for s in picked]),
                      torch.tensor([plan.slots[s] for s in picked]), torch.tensor([lens[s] for s in picked]))
        ctx.meta = CpuStep(plan, decode, [None] * ctx.cache.num_layers)

    def write_kv(self, ctx, layer: int, key: Tensor, value: Tensor) -> None:
        k_pool, v_pool = ctx.cache.layer_pools(layer)
        if self._scatter is not None:  # K and V in one byte-copy call
            self._scatter(key, value, k_pool.permute(0, 2, 1, 3), v_pool.permute(0, 2, 1, 3), ctx.slot_mapping,
                          k_pool.shape[1])
        else:
            super().write_kv(ctx, layer, key, value)
        rows = ctx.cache.backend_state
        if isinstance(ctx.meta, CpuStep):
            ctx.meta.arenas[layer] = rows.append(layer, ctx.meta.plan, key, value, k_pool, v_pool, ctx.block_tables)
        else:  # the rows do not see this write
            rows.invalidate()

    def attend(self, ctx, layer: int, q: Tensor, *, scale: float, sliding_window: int | None,
               softcap: float | None, sinks: Tensor | None = None) -> Tensor:
        step = ctx.meta
        if sinks is not None or not isinstance(step, CpuStep) or step.arenas[layer] is None:
            # the reference path over the pools (it plans for itself when the metadata is not its own)
            return super().attend(ctx, layer, q, scale=scale, sliding_window=sliding_window, softcap=softcap,
                                  sinks=sinks)
        k_arena, v_arena = step.arenas[layer]
        cu, lens, slots = ctx.host_cu_seqlens_q, ctx.host_context_lens, step.plan.slots
        if softcap is None and sliding_window is None and step.decode is not None:
            # every single-query sequence in one call, bitwise the per-sequence SDPA calls
            only_decode, rows, row_slots, row_lens = step.decode
            t, h_q, d = q.shape
            h_kv = k_arena.shape[1]
            out = torch.empty_like(q)
            if len(rows):
                self._decode(q.view(t, h_kv, h_q // h_kv, d), k_arena, v_arena, rows, row_slots, row_lens, scale,
                             out.view(t, h_kv, h_q // h_kv, d))
            if not only_decode:
                sequence_attention_ref(q, cu, lens, k_arena, v_arena, slots=slots, scale=scale, out=out,
                                       skip_decode=True)
            return out
        return sequence_attention_ref(q, cu, lens, k_arena, v_arena, slots=slots, scale=scale,
                                      sliding_window=sliding_window, softcap=softcap)

    def release(self, cache, seq: object) -> None:
        cache.backend_state.drop(seq)

    def invalidate(self, cache) -> None:
        cache.backend_state.invalidate()

    def fused_ops(self, model: nn.Module, hidden: Tensor) -> FusedOps:
        if hidden.device.type != "cpu" or hidden.dtype != torch.float32:
            return STOCK_OPS
        one_thread = torch.get_num_threads() == 1
        per_model = self._ops.get(model)
        if per_model is None:
            per_model = self._ops[model] = {}
        ops = per_model.get(one_thread)
        if ops is None:
            ops = per_model[one_thread] = self._make_ops(model, one_thread)
        return ops

    def _make_ops(self, model: nn.Module, one_thread: bool) -> FusedOps:
        rms, rope, silu_mul = ext.rms_norm(), ext.rope(), ext.silu_mul()
        size = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if is_plain_linear(m))
        pack = ext.packed_gemm() is not None and size <= packed.PACK_BUDGET_BYTES

        def norm(module: nn.Module, x: Tensor) -> Tensor:
            if rms is not None and module.weight.dtype == torch.float32:
                return rms(x, module.weight, module.variance_epsilon)
            return module.forward(x)

        def act_mul(act: nn.Module, gate: Tensor, up: Tensor) -> Tensor:
            # one pass where torch's silu would run as one chunk (one thread or a small tensor)
            if silu_mul is not None and type(act) in _SILU and (gate.numel() < _ONE_CHUNK or one_thread):
                return silu_mul(gate, up)
            return act(gate) * up

        def linear(module: nn.Module):
            if not is_plain_linear(module):  # a quantized layer computes its own product
                return module
            wrapper = self.linears.get(module)
            if wrapper is None:  # made on first sight, so a projection replaced later gets its own
                wrapper = self.linears[module] = packed.PackedLinear(module, pack)
            return wrapper

        return FusedOps(norm=norm, rope=rope, act_mul=act_mul, linear=linear)
