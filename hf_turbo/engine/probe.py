"""The packed-forward probe: does this model give its own logits when the engine runs it?

The engine runs a stock model in a way its authors did not write it for: several sequences packed
into one row ``[1, T]`` with explicit ``position_ids``, no attention mask, and a
:class:`~hf_turbo.cache.paged_cache.PagedKVCache` instead of the model's own cache. A model that
computes positions itself, keeps state of its own (recurrent layers, a cache class of its own),
attends bidirectionally, or mixes tokens across the sequence outside attention gives other logits
that way, or raises. Rather than list such families by name, :func:`probe_packed_forward` runs the
model both ways on a few tokens and compares, so an architecture released next month is judged by
what it does.

Cost: six forwards of at most 8 tokens (four stock: two prompts of ``PROBE_PROMPT_LENS`` tokens,
then one decode token each through the model's own cache; two packed: 8 tokens, then 2) on a scratch
paged cache of a few blocks, about what generating 6 tokens costs; on a 70B model a fraction of a
second on a GPU and no memory beyond a dozen tokens' K/V. Measured on the 3M-parameter fixture
(CPU, one thread): 64 ms, against 28 ms for a stock 3-token generate().
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from hf_turbo.backends import get_backend
from hf_turbo.backends.base import is_plain_linear
from hf_turbo.cache.paged_cache import ForwardContext, PagedKVCache, kv_layout
from hf_turbo.engine.lean import linear_kind
from hf_turbo.patches.attention import CTX_KWARG, engine_forward
from hf_turbo.patches.compat import cache_kwarg_name, forward_cache_kwargs

__all__ = ["probe_packed_forward", "probe_tolerance", "PROBE_PROMPT_LENS"]

logger = logging.getLogger(__name__)

PROBE_PROMPT_LENS = (5, 3)  # two prompts (different lengths, so a position bug shows), then one decode step
_BLOCK = 4  # scratch block size: small, so the prompts span blocks and block tables are exercised


def probe_tolerance(reference: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest accepted |packed - stock| logit difference for ``reference`` logits of a ``dtype`` model.

    float32: the two paths differ only in summation order (attention kernel, matmul row count): on the
    25 test architectures at most 0.1% of this tolerance, while the bugs the registry sweep found (a
    dropped position, a lost decode context, sinks ignored) moved logits by 50-100% of their scale.
    16-bit: one rounding of a logit near 10 is 0.06 in bfloat16 and roundings compound over the
    layers, so only 10% of the scale counts as wrong (the test architectures reach 13% of that);
    float32 is where the strict check runs.
    """
    scale = max(1.0, float(reference.float().abs().max()))
    rel = 1e-3 if dtype in (torch.float32, torch.float64) else 1e-1
    return rel * scale


def _probe_tokens(vocab: int, n: int, salt: int) -> list[int]:
    # spread over the vocabulary, away from the low ids where special tokens usually sit
    lo = min(vocab - 1, 16)
    return [lo + (salt * 7919 + i * 104729) % max(1, vocab - lo) for i in range(n)]


@torch.inference_mode()
def _stock_logits(model, seqs: list[list[int]], device) -> tuple[list[torch.Tensor], dict[int, int]]:
    """Per sequence: logits at every prompt position, then at the decode token through the model's cache;
    and the sliding windows the model's own cache keeps per layer."""
    out, windows = [], {}
    for seq in seqs:
        prompt, nxt = seq[:-1], seq[-1:]
        first = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
        cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
        for i, layer in enumerate(getattr(cache, "layers", None) or []):
            if getattr(layer, "sliding_window", None) is not None:
                windows[i] = layer.sliding_window
        kwargs = {} if cache is None else {cache_kwarg_name(): cache}
        second = model(input_ids=torch.tensor([nxt], device=device), use_cache=cache is not None, **kwargs)
        out.append(torch.cat([first.logits[0], second.logits[0, -1:]]).float())
    return out, windows


@torch.inference_mode()
def _packed_logits(model, seqs: list[list[int]], device, dtype, backend: str, windows: dict[int, int | None]
                   ) -> list[torch.Tensor]:
    """The same logits from the engine's kind of forward: both prompts in one packed forward, then both
    decode tokens in another, on a scratch paged cache. Fills ``windows`` with the sliding window each
    cache layer's attention ran with."""
    num_layers = kv_layout(model.config)[0]
    tables, nblocks = [], 0
    for seq in seqs:
        n = -(-len(seq) // _BLOCK)
        tables.append(list(range(nblocks, nblocks + n)))
        nblocks += n
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
    cache = PagedKVCache(nblocks, _BLOCK, num_layers, dtype, device, backend=get_backend(backend, device))

    def forward(ids: list[int], pos: list[int], lens: list[int], news: list[int]) -> torch.Tensor:
        cu = [0]
        for n in news:
            cu.append(cu[-1] + n)
        slots = [tables[s][p // _BLOCK] * _BLOCK + p % _BLOCK for s, n in enumerate(news)
                 for p in range(lens[s] - n, lens[s])]
        ctx = ForwardContext(
            cache=cache, slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            context_lens=torch.tensor(lens, dtype=torch.int32, device=device), block_tables=block_tables,
            max_seqlen_q=max(news), max_context_len=max(lens), backend=cache.backend, host_cu_seqlens_q=cu,
            host_context_lens=lens, seen_windows=windows)
        cache.backend.prepare(ctx)
        cache.ctx = ctx
        try:
            with engine_forward(ctx):
                return model(input_ids=torch.tensor([ids], device=device),
                             position_ids=torch.tensor([pos], device=device),
                             logits_to_keep=torch.arange(len(ids), device=device), **forward_cache_kwargs(cache),
                             **{CTX_KWARG: ctx}).logits[0].float()
        finally:
            cache.ctx = None

    prompts = [seq[:-1] for seq in seqs]
    first = forward([t for p in prompts for t in p], [i for p in prompts for i in range(len(p))],
                    [len(p) for p in prompts], [len(p) for p in prompts])
    second = forward([seq[-1] for seq in seqs], [len(p) for p in prompts], [len(s) for s in seqs], [1] * len(seqs))
    out, start = [], 0
    for s, p in enumerate(prompts):
        out.append(torch.cat([first[start:start + len(p)], second[s:s + 1]]))
        start += len(p)
    return out


def probe_packed_forward(model, switch_attention, backend: str = "auto", windows: dict | None = None) -> str | None:
    """Run ``model`` stock and as the engine runs it on a few tokens; None if they agree, else why not.

    ``switch_attention()`` is called between the two runs and must make the model use the "hf_turbo"
    attention (the stock run uses whatever the model was set to). Logits are compared at every prompt
    position and at one decode step of each of two prompts, within :func:`probe_tolerance`.
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    emb = model.get_input_embeddings()
    vocab = emb.weight.shape[0] if getattr(emb, "weight", None) is not None else model.config.vocab_size
    seqs = [_probe_tokens(vocab, n + 1, salt) for salt, n in enumerate(PROBE_PROMPT_LENS)]
    was_training = model.training
    model.eval()
    try:
        try:
            stock, stock_windows = _stock_logits(model, seqs, device)
        except Exception as exc:  # noqa: BLE001 - the model's own forward: name the failure, do not judge
            return f"its stock forward raised {type(exc).__name__} on a {len(seqs[0]) - 1}-token prompt: {exc}"
        switch_attention()
        try:
            packed_windows = {} if windows is None else windows  # the caller may keep what each layer attended with
            packed = _packed_logits(model, seqs, device, dtype, backend, packed_windows)
        except Exception as exc:  # noqa: BLE001 - any failure means: the engine cannot run this model
            logger.debug("packed probe forward failed", exc_info=True)
            return f"the packed paged forward raised {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        model.train(was_training)
    for layer, window in sorted(stock_windows.items()):
        if packed_windows.get(layer) != window:
            # e.g. moshi: a full causal mask, but a cache that keeps only the last tokens, so decode steps
            # (not the prefill) see a window; the paged kernels take the window from the attention call
            return (f"its own cache keeps a sliding window of {window} tokens in layer {layer}, but that layer's "
                    f"attention call carries sliding_window={packed_windows.get(layer)}, so the window would be lost")
    for s, (ref, got) in enumerate(zip(stock, packed)):
        if ref.shape != got.shape:
            return f"the packed forward's logits have shape {tuple(got.shape)}, stock's {tuple(ref.shape)}"
        if not torch.isfinite(got).all() and torch.isfinite(ref).all():
            return "the packed forward gives non-finite logits where stock's are finite"
        diff = (got - ref).abs().nan_to_num(0.0)
        tol = probe_tolerance(ref, dtype)
        if float(diff.max()) > tol:
            row = int(diff.max(dim=-1).values.argmax())
            where = "the decode step" if row == ref.shape[0] - 1 else f"prompt position {row}"
            return (f"the packed paged forward's logits differ from stock's by {float(diff.max()):.3g} "
                    f"(tolerance {tol:.3g}) at {where} of probe prompt {s}: the model computes something "
                    "(positions, state of its own, attention outside transformers' interface) that the "
                    "packed forward does not reproduce" + _quantized_hint(model))
    return None


def _quantized_hint(model) -> str:
    """Why a quantized model may differ: its products may depend on the other rows of a packed batch."""
    kinds = sorted({linear_kind(m) for m in model.modules() if isinstance(m, nn.Linear) and not is_plain_linear(m)})
    if not kinds:
        return ""
    return (f"; or its quantized linear layers ({', '.join(kinds)}) compute a row's product from the whole batch "
            "(bitsandbytes' LLM.int8() picks outlier columns over all rows: BitsAndBytesConfig(llm_int8_threshold=0.0) "
            "makes each row independent)")


@torch.inference_mode()
def attended_windows(model, backend: str = "reference") -> dict[int, int]:
    """The sliding window each cache layer's attention runs with, read from one short packed forward of the
    model as the engine runs it (its "hf_turbo" attention already attached); layers attending over the whole
    context are left out."""
    param = next(model.parameters())
    emb = model.get_input_embeddings()
    vocab = emb.weight.shape[0] if getattr(emb, "weight", None) is not None else model.config.vocab_size
    windows: dict[int, int | None] = {}
    was_training = model.training
    model.eval()
    try:
        _packed_logits(model, [_probe_tokens(vocab, 3, 0)], param.device, param.dtype, backend, windows)
    finally:
        model.train(was_training)
    return {layer: int(w) for layer, w in windows.items() if w is not None}
