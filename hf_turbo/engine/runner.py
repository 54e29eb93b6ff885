"""The runner: packs one step's work into ONE flat varlen forward of the stock HF model.

All scheduled sequences are laid back to back in ``input_ids`` [1, T] with explicit
``position_ids``; a :class:`ForwardContext` (slot mapping, cu_seqlens, context lengths, block
tables) rides along in the forward's kwargs to the "hf_turbo" attention, and the paged cache is the
model's ``Cache``. Logits are computed only at the positions that are sampled (``logits_to_keep``
as an index tensor).
"""

from __future__ import annotations

import torch

from hf_turbo.cache.paged_cache import ForwardContext, PagedKVCache
from hf_turbo.engine.request import Request
from hf_turbo.patches.attention import CTX_KWARG
from hf_turbo.patches.compat import forward_cache_kwargs

__all__ = ["ModelRunner"]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, backend: str = "auto") -> None:
        self.model = model
        self.cache = cache
        self.backend = backend
        self.device = cache.device
        self.block_size = cache.block_size

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
        ctx = ForwardContext(
            cache=self.cache,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(table, dtype=torch.int32, device=dev),
            max_seqlen_q=max_q,
            max_context_len=max(ctx_lens),
            backend=self.backend,
            host_cu_seqlens_q=cu,
            host_context_lens=ctx_lens,
            seqs=[req for req, _ in scheduled],
        )
        self.cache.ctx = ctx
        try:
            out = self.model(
                input_ids=torch.tensor([ids], dtype=torch.long, device=dev),
                position_ids=torch.tensor([pos], dtype=torch.long, device=dev),
                logits_to_keep=torch.tensor(keep, dtype=torch.long, device=dev),
                **forward_cache_kwargs(self.cache),
                **{CTX_KWARG: ctx},
            )
        finally:
            self.cache.ctx = None
        return out.logits[0].float()
