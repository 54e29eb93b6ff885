"""The runner: packs one step's work into ONE flat varlen forward of the stock HF model.

All scheduled sequences are laid back to back in ``input_ids`` [1, T] with explicit
``position_ids``; a :class:`ForwardContext` (slot mapping, cu_seqlens, context lengths, block
tables) rides along in the forward's kwargs to the "hf_turbo" attention, and the paged cache is the
model's ``Cache``. Logits are computed only at the positions that are sampled (``logits_to_keep``
as an index tensor).

For stock Llama-structured models the forward goes through :class:`~hf_turbo.engine.lean.LeanForward`
(the same ops without the module machinery), once it has been checked: before the first step, the
runner runs the lean forward and the model's own on a scratch cache (two short sequences made of the
step's first prompt tokens, every position's logits) and keeps the lean one only if the logits are
bitwise equal. The check costs two forwards of a few dozen tokens and touches no engine state, so
even an engine whose first steps are 2,048-token prefills runs them lean.

The step's metadata reaches the device through :class:`~hf_turbo.engine.staging.StepStaging` (persistent
buffers, non-blocking copies: no host sync). Once the lean forward is verified, a decode-only step goes
to ``graphs`` (:class:`~hf_turbo.engine.graphs.DecodeGraphs`, when the engine enabled them): padded to a
bucket and replayed as a CUDA graph; a step outside its buckets runs here, eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from hf_turbo.cache.paged_cache import ForwardContext, PagedKVCache
from hf_turbo.engine.graphs import DecodeGraphs, DeviceIds, is_decode_only
from hf_turbo.engine.lean import LeanForward
from hf_turbo.engine.request import Request
from hf_turbo.engine.staging import StepStaging
from hf_turbo.patches.attention import CTX_KWARG, engine_forward
from hf_turbo.patches.compat import forward_cache_kwargs

__all__ = ["ModelRunner"]

logger = logging.getLogger(__name__)

LEAN_CHECK_TOKENS = (16, 5)  # the lengths of the two scratch sequences of the lean forward's check (at most)


class ModelRunner:
    """Packs scheduled requests into one forward of ``model`` over ``cache``.

    ``lean``: use :class:`LeanForward` where the model qualifies, once a step has shown that it
    gives the model's logits bit for bit (``lean_verified``).
    """

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, lean: bool = True) -> None:
        self.model = model
        self.cache = cache
        self.backend = cache.backend
        self.device = cache.device
        self.block_size = cache.block_size
        self.lean = LeanForward.build(model) if lean else None
        self.lean_verified = False
        self.staging = StepStaging(self.device)  # the step's metadata: persistent buffers, non-blocking copies
        self.graphs: DecodeGraphs | None = None  # decode steps on static buffers (engine/graphs.py), when enabled

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Request, int]], logit_rows: list[list[int]] | None = None,
                ids_from: DeviceIds | None = None) -> torch.Tensor:
        """Run the forward for ``scheduled`` [(request, n new tokens)].

        ``logit_rows[i]`` lists the offsets within sequence i's chunk whose logits are wanted
        (default: the last token if the chunk reaches the end of the sequence). A request's
        ``spec_tokens`` are computed as if appended to its ``token_ids``. Returns float logits
        [N, V] for all wanted positions in order. ``ids_from`` ``(tokens, rows)``: sequence i's one new
        token is ``tokens[rows[i]]``, on the device, where ``rows[i] >= 0`` (engine/lookahead.py).
        """
        lean = self.lean if self.lean is not None and self.lean.usable() else None
        if self.graph_ready(scheduled, logit_rows) and (ids_from is None or min(ids_from[1]) >= 0):
            logits = self.graphs.run([req for req, _ in scheduled], ids_from)
            if logits is not None:  # a static buffer on CUDA: the caller gets its own copy
                return logits.float() if logits.dtype != torch.float32 or not logits.is_cuda else logits.clone()
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        cu = [0]
        ctx_lens: list[int] = []
        keep: list[int] = []
        max_q = 0
        max_blocks = 1
        for i, (req, n) in enumerate(scheduled):
            start = req.num_computed
            end = start + n
            num_own = len(req.token_ids)
            blocks = req.block_ids
            if n == 1 and end <= num_own:  # a decode row: no per-token loop
                ids.append(req.token_ids[start])
                pos.append(start)
                slots.append(blocks[start // bs] * bs + start % bs)
            else:
                ids.extend(req.token_ids[start:end])
                if end > num_own:  # proposed tokens under verification follow the request's own tokens
                    ids.extend(req.spec_tokens[max(start - num_own, 0):end - num_own])
                p = np.arange(start, end)
                pos.extend(range(start, end))
                slots.extend((np.asarray(blocks, dtype=np.int64)[p // bs] * bs + p % bs).tolist())
            base = cu[-1]
            if logit_rows is None:
                if end == req.num_tokens:
                    keep.append(base + n - 1)
            else:
                keep.extend(base + j for j in logit_rows[i])
            cu.append(base + n)
            ctx_lens.append(end)
            max_q = max(max_q, n)
            max_blocks = max(max_blocks, len(blocks))
        table = [req.block_ids + [0] * (max_blocks - len(req.block_ids)) for req, _ in scheduled]
        seqs = [req for req, _ in scheduled]
        parts = {"ids": (ids, torch.int64), "pos": (pos, torch.int64), "keep": (keep, torch.int64),
                 "slots": (slots, torch.int64), "cu": (cu, torch.int32), "lens": (ctx_lens, torch.int32),
                 "table": (table, torch.int32)}
        sliding = self.cache.sliding
        if sliding is not None:  # the sliding layers' own blocks: holds moved to this step's windows, ids mapped
            sliding.plan(scheduled)
            parts["sliding_slots"] = (sliding.map_slots(np.asarray(slots, dtype=np.int64)), torch.int64)
            parts["sliding_table"] = (sliding.map_table(np.asarray(table, dtype=np.int64)), torch.int32)
        if ids_from is not None:  # the rows' token positions in ``ids`` and their rows in the device tokens
            parts["at"] = ([cu[i] for i, r in enumerate(ids_from[1]) if r >= 0], torch.int64)
            parts["src"] = ([r for r in ids_from[1] if r >= 0], torch.int64)
        staged = self.staging.stage(parts)
        if ids_from is not None:  # stream-ordered after the staging copy, before the forward
            staged["ids"].index_copy_(0, staged["at"], ids_from[0].index_select(0, staged["src"]))
        input_ids, position_ids, logits_to_keep = staged["ids"][None], staged["pos"][None], staged["keep"]
        ctx = ForwardContext(
            cache=self.cache, slot_mapping=staged["slots"], cu_seqlens_q=staged["cu"], context_lens=staged["lens"],
            block_tables=staged["table"], max_seqlen_q=max_q, max_context_len=max(ctx_lens), host_cu_seqlens_q=cu,
            host_context_lens=ctx_lens, backend=self.backend, seqs=seqs)
        if sliding is not None:
            ctx.sliding = replace(ctx, slot_mapping=staged["sliding_slots"], block_tables=staged["sliding_table"])
        extra = self._model_inputs(scheduled, input_ids)
        if extra:  # generate()'s inputs_embeds / token_type_ids: the model's own forward takes them
            return self._run(lambda c: self._model_forward(input_ids, position_ids, logits_to_keep, c, extra),
                             ctx)[0].float()
        if lean is not None and not self.lean_verified:
            self._check_lean(seqs)
            lean = self.lean if self.lean_verified else None
        if lean is not None:
            return self._run(lambda c: lean(input_ids, position_ids, logits_to_keep, c), ctx)[0].float()
        return self._run(lambda c: self._model_forward(input_ids, position_ids, logits_to_keep, c), ctx)[0].float()

    def graph_ready(self, scheduled: list[tuple[Request, int]], logit_rows: list[list[int]] | None) -> bool:
        """Whether ``graphs`` can run this step: a verified lean forward and plain decode rows only."""
        return self.graphs is not None and self.lean is not None and self.lean.usable() and self.lean_verified \
            and is_decode_only(scheduled, logit_rows) \
            and not any(getattr(req, "model_inputs", None) for req, _ in scheduled)

    def _context(self, cache: PagedKVCache, slots: list[int], cu: list[int], lens: list[int], table: list[list[int]],
                 max_q: int, seqs: list[Request] | None) -> ForwardContext:
        """One forward's context (a fresh one per forward: it caches per-forward plans)."""
        dev = self.device
        return ForwardContext(
            cache=cache, slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(table, dtype=torch.int32, device=dev), max_seqlen_q=max_q,
            max_context_len=max(lens), host_cu_seqlens_q=cu, host_context_lens=lens, backend=cache.backend, seqs=seqs)

    def _model_forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_to_keep: torch.Tensor,
                       ctx: ForwardContext, extra: dict | None = None) -> torch.Tensor:
        tokens = {"input_ids": input_ids} if not extra or "inputs_embeds" not in extra else {}
        return self.model(**tokens, position_ids=position_ids, logits_to_keep=logits_to_keep,
                          **forward_cache_kwargs(ctx.cache), **{CTX_KWARG: ctx}, **(extra or {})).logits

    def _model_inputs(self, scheduled: list[tuple[Request, int]], input_ids: torch.Tensor) -> dict:
        """The step's per-token model inputs from requests that carry them (``Request.model_inputs``):
        ``token_type_ids`` [1, T] (positions past the prompt repeat its last value, as stock generate()
        extends them) and ``inputs_embeds`` [1, T, H] (the prompt's given vectors, the embedding table's
        rows for every other token). Empty when no request carries any."""
        carried = [getattr(req, "model_inputs", None) or {} for req, _ in scheduled]
        if not any(carried):
            return {}
        extra = {}
        if any("token_type_ids" in m for m in carried):
            parts = []
            for (req, n), m in zip(scheduled, carried):
                types = m.get("token_type_ids")
                if types is None:
                    raise ValueError("token_type_ids: a step cannot mix requests with and without token types")
                at = torch.arange(req.num_computed, req.num_computed + n).clamp(max=types.shape[0] - 1)
                parts.append(types[at])
            extra["token_type_ids"] = torch.cat(parts)[None].to(self.device)
        if any("inputs_embeds" in m for m in carried):
            embeds = self.model.get_input_embeddings()(input_ids)  # [1, T, H]
            base = 0
            for (req, n), m in zip(scheduled, carried):
                given = m.get("inputs_embeds")
                k = 0 if given is None else max(0, min(n, given.shape[0] - req.num_computed))
                if k:
                    embeds[0, base:base + k] = given[req.num_computed:req.num_computed + k].to(embeds)
                base += n
            extra["inputs_embeds"] = embeds
        return extra

    def _run(self, forward, ctx: ForwardContext) -> torch.Tensor:
        ctx.backend.prepare(ctx)  # every piece of per-forward metadata, before any layer runs
        if ctx.sliding is not None:
            ctx.backend.prepare(ctx.sliding)
        ctx.cache.ctx = ctx
        try:
            with engine_forward(ctx):
                logits = forward(ctx)
        finally:
            ctx.cache.ctx = None
        return logits.to(self.device)  # a layer-split model's head may sit on another device (a no-op otherwise)

    def _check_lean(self, seqs: list[Request]) -> None:
        """Compare the lean forward with the model's on a scratch cache; keep it only if bitwise equal.

        Two sequences (the first ``LEAN_CHECK_TOKENS`` tokens of the step's first and last requests)
        are packed into one forward, as a step packs them, and every position's logits are compared.
        """
        first, last = seqs[0].token_ids, seqs[-1].token_ids
        parts = [first[:LEAN_CHECK_TOKENS[0]], last[:LEAN_CHECK_TOKENS[1]]]
        bs, dev = self.block_size, self.device
        ids, pos, slots, table, cu = [], [], [], [], [0]
        next_block = 0
        for part in parts:
            blocks = list(range(next_block, next_block + -(-len(part) // bs)))
            next_block += len(blocks)
            ids += part
            pos += range(len(part))
            slots += [blocks[p // bs] * bs + p % bs for p in range(len(part))]
            table.append(blocks)
            cu.append(cu[-1] + len(part))
        width = max(len(t) for t in table)
        table = [t + [0] * (width - len(t)) for t in table]
        lens = [len(p) for p in parts]
        scratch = PagedKVCache(next_block, bs, self.cache.num_layers, self.cache.dtype, dev, backend=self.backend,
                               kv_dtype=self.cache.kv_dtype)
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        position_ids = torch.tensor([pos], dtype=torch.long, device=dev)
        keep = torch.arange(len(ids), device=dev)


        def context() -> ForwardContext:
            return self._context(scratch, slots, cu, lens, table, max(lens), None)

        lean = self.lean
        try:
            lean_logits = self._run(lambda ctx: lean(input_ids, position_ids, keep, ctx), context())
        except Exception as exc:  # noqa: BLE001 - any failure means: not this path
            lean_logits = exc
        try:
            logits = self._run(lambda ctx: self._model_forward(input_ids, position_ids, keep, ctx), context())
        except Exception as exc:  # noqa: BLE001 - cannot check: keep calling the model
            lean_logits, logits = exc, None
        if isinstance(lean_logits, torch.Tensor) and lean_logits.shape == logits.shape and torch.equal(lean_logits,
                                                                                                      logits):
            self.lean_verified = True
            return
        if isinstance(lean_logits, Exception):
            why = f"it raised {type(lean_logits).__name__}: {lean_logits}"
        elif lean_logits.shape != logits.shape:
            why = f"its logits have shape {tuple(lean_logits.shape)}, not {tuple(logits.shape)}"
        else:
            diff = (lean_logits.float() - logits.float()).abs().nan_to_num(float("inf")).max().item()
            why = f"its logits differ from the model's by up to {diff:.3g}"
        logger.warning("%s: the lean forward is off for this engine (%s); every step calls the model",
                       type(self.model).__name__, why)
        self.lean = None
