"""Helpers for exactness tests and evals: padded batches, and telling near-ties from bugs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["left_pad", "Divergence", "first_divergence", "explain_divergence", "stock_and_accelerated",
           "NEAR_TIE_FP32"]

NEAR_TIE_FP32 = 1e-4  # stock's top-2 logit gap under this is a genuine tie at fp32 rounding


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with each row right-aligned, like a left-padding tokenizer."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


@dataclass
class Divergence:
    row: int
    position: int  # index among generated tokens
    stock_token: int
    turbo_token: int
    top2_gap: float | None = None
    turbo_is_second_choice: bool | None = None

    @property
    def near_tie(self) -> bool:
        return self.top2_gap is not None and self.top2_gap < NEAR_TIE_FP32 and bool(self.turbo_is_second_choice)


def first_divergence(stock: list[int], turbo: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length if one is a prefix), else None."""
    for i, (a, b) in enumerate(zip(stock, turbo)):
        if a != b:
            return i
    return None if len(stock) == len(turbo) else min(len(stock), len(turbo))


@torch.no_grad()
def explain_divergence(model, prompt: list[int], stock_new: list[int], turbo_new: list[int], row: int = 0
                       ) -> Divergence | None:
    """Where stock and turbo first differ, stock's top-2 logit gap there (a plain stock forward)."""
    pos = first_divergence(stock_new, turbo_new)
    if pos is None:
        return None
    s_tok = stock_new[pos] if pos < len(stock_new) else -1
    t_tok = turbo_new[pos] if pos < len(turbo_new) else -1
    ctx = torch.tensor([prompt + stock_new[:pos]], device=model.device)
    logits = model(input_ids=ctx).logits[0, -1].float()
    top = torch.topk(logits, 2)
    gap = float(top.values[0] - top.values[1])
    return Divergence(row, pos, s_tok, t_tok, gap, int(top.indices[1]) == t_tok)


def stock_and_accelerated(model, **generate_kwargs):
    """``model.generate(**generate_kwargs)`` stock, then accelerated (restored afterwards): (stock, fast)."""
    import hf_turbo

    stock = model.generate(**generate_kwargs)
    hf_turbo.accelerate(model)
    try:
        fast = model.generate(**generate_kwargs)
    finally:
        hf_turbo.restore(model)
    return stock, fast


def masked_batch(vocab: int, seed: int = 0, rows: int = 3, width: int = 11, holes: bool = True):
    """Random ``(input_ids, attention_mask)`` [rows, width]: row 1 left-padded by 2, and with ``holes``
    masked columns inside rows 0 and 1 (what transformers' generation tests feed generate())."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    if holes:
        mask[0, 3] = mask[0, 6] = mask[1, 5] = 0
    return ids, mask


def generate_both(model, **generate_kwargs):
    """``(stock, accelerated, fallback reasons)``: ``model.generate(**generate_kwargs)`` stock, then
    accelerated (restored afterwards), with the fallback lines the accelerated call logged; checks that
    the engine was left with no request and no leaked block."""
    import logging

    import hf_turbo

    messages: list[str] = []

    class _Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "falls back" in record.getMessage():
                messages.append(record.getMessage())

    stock = model.generate(**generate_kwargs)
    hf_turbo.accelerate(model)
    log = logging.getLogger("hf_turbo")
    handler, level = _Catch(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        fast = model.generate(**generate_kwargs)
        engine = hf_turbo.get_engine(model)
        engine.check_invariants()
        if engine.scheduler.running or engine.scheduler.waiting:
            raise AssertionError("the engine still holds requests after generate()")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        hf_turbo.restore(model)
    return stock, fast, messages
