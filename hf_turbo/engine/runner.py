"""The runner: packs one step's work into ONE flat varlen forward of the stock HF model.

All scheduled sequences are laid back to back in ``input_ids`` [1, T] with explicit
``position_ids``; a :class:`ForwardContext` (slot mapping, cu_seqlens, context lengths, block
tables) rides along in the forward's kwargs to the "hf_turbo" attention, and the paged cache is the
model's ``Cache``. Logits are computed only at the positions that are sampled (``logits_to_keep``
as an index tensor).

For stock Llama-structured models the forward goes through :class:`~hf_turbo.engine.lean.LeanForward`
(the same ops without the module machinery). Until it has been checked, steps call the model; the
first step of at most ``LEAN_CHECK_TOKENS`` tokens runs the lean forward and then the model's own,
and the lean one is kept only if the logits are bitwise equal. The model's forward runs second, so
its K/V are what the cache holds either way.
"""

from __future__ import annotations

import logging

import torch

from hf_turbo.cache.paged_cache import ForwardContext, PagedKVCache
from hf_turbo.engine.lean import LeanForward
from hf_turbo.engine.request import Request
from hf_turbo.patches.attention import CTX_KWARG
from hf_turbo.patches.compat import forward_cache_kwargs

__all__ = ["ModelRunner"]

logger = logging.getLogger(__name__)

LEAN_CHECK_TOKENS = 256  # the lean forward is checked on a step this small (a second forward costs little)


class ModelRunner:
    """Packs scheduled requests into one forward of ``model`` over ``cache``.

    ``lean``: use :class:`LeanForward` where the model qualifies, once a step has shown that it
    gives the model's logits bit for bit (``lean_verified``).
    """

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, backend: str = "auto", lean: bool = True) -> None:
        self.model = model
        self.cache = cache
        self.backend = backend
        self.device = cache.device
        self.block_size = cache.block_size
        self.lean = LeanForward.build(model) if lean else None
        self.lean_verified = False

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Request, int]], logit_rows: list[list[int]] | None = None
                ) -> torch.Tensor:
        """Run the forward for ``scheduled`` [(request, n new tokens)].

        ``logit_rows[i]`` lists the offsets within sequence i's chunk whose logits are wanted
        (default: the last token if the chunk reaches the end of the sequence). A request's
        ``spec_tokens`` are computed as if appended to its ``token_ids``. Returns float logits
        [N, V] for all wanted positions in order.
        """
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
            ids.extend(req.token_ids[start:end])
            num_own = len(req.token_ids)
            if end > num_own:  # proposed tokens under verification follow the request's own tokens
                ids.extend(req.spec_tokens[max(start - num_own, 0):end - num_own])
            pos.extend(range(start, end))
            blocks = req.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
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
        dev = self.device
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=dev)
        cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)
        lens_t = torch.tensor(ctx_lens, dtype=torch.int32, device=dev)
        table_t = torch.tensor(table, dtype=torch.int32, device=dev)
        seqs = [req for req, _ in scheduled]
        max_ctx = max(ctx_lens)

        def context() -> ForwardContext:  # a fresh one per forward: it caches per-forward plans
            return ForwardContext(
                cache=self.cache, slot_mapping=slot_mapping, cu_seqlens_q=cu_t, context_lens=lens_t,
                block_tables=table_t, max_seqlen_q=max_q, max_context_len=max_ctx, backend=self.backend,
                host_cu_seqlens_q=cu, host_context_lens=ctx_lens, seqs=seqs)

        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        position_ids = torch.tensor([pos], dtype=torch.long, device=dev)
        logits_to_keep = torch.tensor(keep, dtype=torch.long, device=dev)
        lean = self.lean if self.lean is not None and self.lean.usable() else None
        if lean is not None and not self.lean_verified and len(ids) > LEAN_CHECK_TOKENS:
            lean = None  # not checked yet, and this step is too big to run twice

        def lean_forward(ctx: ForwardContext) -> torch.Tensor:
            return lean(input_ids, position_ids, logits_to_keep, ctx)

        if lean is not None and self.lean_verified:
            return self._run(lean_forward, context())[0].float()
        if lean is not None:
            try:
                lean_logits = self._run(lean_forward, context())
            except Exception as exc:  # noqa: BLE001 - any failure means: not this path
                lean_logits = exc
        logits = self._run(lambda ctx: self.model(
            input_ids=input_ids, position_ids=position_ids, logits_to_keep=logits_to_keep,
            **forward_cache_kwargs(self.cache), **{CTX_KWARG: ctx}).logits, context())
        if lean is not None:
            self._check_lean(lean_logits, logits)
        return logits[0].float()

    def _run(self, forward, ctx: ForwardContext) -> torch.Tensor:
        self.cache.ctx = ctx
        try:
            return forward(ctx)
        finally:
            self.cache.ctx = None

    def _check_lean(self, lean_logits, logits: torch.Tensor) -> None:
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
