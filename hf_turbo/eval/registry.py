"""The registry sweep: every causal-LM architecture of the installed transformers, stock vs accelerated.

For each ``model_type`` in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a seeded random float32 model is built
from a small config (:func:`hf_turbo.testing.registry.registry_model`), stock greedy ``generate()`` runs
on two prompts (5 and 23 tokens) one at a time and as one left-padded batch, 16 new tokens each, then
``hf_turbo.accelerate()`` and the same three calls again. Each architecture gets one result:

* ``identical``: every row equal token for token;
* ``near-tie``: rows differ only where stock's top-2 logit gap is a genuine fp32 tie
  (:mod:`hf_turbo.eval.exactness`, the eval suite's rule);
* ``refused``: ``accelerate()`` raised ValueError (its reason is the detail);
* ``wrong``: different tokens away from a tie (a bug);
* ``raises``: ``accelerate()`` or the accelerated ``generate()`` raised something else (a bug);
* ``not-buildable``: no small config, too big from one, or stock ``generate()`` itself fails.

``hf-turbo eval --arch registry`` prints the table (``--arch registry=llama,gpt2`` for some types).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["RegistryRow", "RESULTS", "BUGS", "check_model_type", "run_sweep", "format_registry_table",
           "PROMPT_LENS", "MAX_NEW_TOKENS"]

logger = logging.getLogger(__name__)

RESULTS = ("identical", "near-tie", "refused", "wrong", "raises", "not-buildable")
BUGS = ("wrong", "raises")
PROMPT_LENS = (5, 23)
MAX_NEW_TOKENS = 16
# address space one model type may add to the process: a small config that still allocates gigabytes
# (transformers 5.17's falcon_h1 grew past 10 GiB) fails with a MemoryError instead of taking the machine
MEMORY_CAP_BYTES = 8 << 30


@dataclass
class RegistryRow:
    model_type: str
    result: str  # one of RESULTS
    detail: str = ""
    seconds: float = 0.0


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    low = min(16, vocab - 1)  # keep clear of the low ids where special tokens sit
    return [torch.randint(low, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _pad_id(model) -> int:
    for value in (model.generation_config.pad_token_id, model.generation_config.eos_token_id, 0):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, torch.Tensor):
            value = int(value.reshape(-1)[0])
        if value is not None:
            return int(value)
    return 0


def _generate_all(model, prompts: list[list[int]], pad: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, new tokens) per row: each prompt alone, then both as one left-padded batch."""
    from hf_turbo.eval.exactness import left_pad

    kw = {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False, "num_beams": 1, "pad_token_id": pad}
    rows = []
    for p in prompts:
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)
        rows.append((p, out[0, len(p):].tolist()))
    ids, mask = left_pad(prompts, pad)
    out = model.generate(ids, attention_mask=mask, **kw)
    rows.extend((p, out[i, ids.shape[1]:].tolist()) for i, p in enumerate(prompts))
    return rows


def _trim(tokens: list[int], pad: int) -> list[int]:
    # rows of a batch that finished early are filled with pad after their EOS: compare up to there
    while tokens and tokens[-1] == pad:
        tokens = tokens[:-1]
    return tokens


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:240]}"


def _attempt(fn):
    """(fn(), None), or (None, the exception it raised): every failure is some architecture's result."""
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001
        return None, exc


def check_model_type(model_type: str, seed: int = 0) -> RegistryRow:
    """Build ``model_type`` small, run stock and accelerated greedy generate(), classify (see module doc)."""
    import hf_turbo
    from hf_turbo.eval.exactness import explain_divergence
    from hf_turbo.testing.registry import registry_model

    start = time.perf_counter()

    def row(result: str, detail: str = "") -> RegistryRow:
        return RegistryRow(model_type, result, detail, round(time.perf_counter() - start, 2))

    model, exc = _attempt(lambda: registry_model(model_type, seed=seed))
    if exc is not None:
        return row("not-buildable", f"build: {_short(exc)}")
    prompts = _prompts(model.get_input_embeddings().weight.shape[0], seed)
    pad = _pad_id(model)
    stock, exc = _attempt(lambda: _generate_all(model, prompts, pad))
    if exc is not None:
        return row("not-buildable", f"stock generate: {_short(exc)}")
    _, exc = _attempt(lambda: hf_turbo.accelerate(model))
    if exc is not None:  # a ValueError is the clear refusal asked for; anything else is a bug
        return row("refused", str(exc)) if isinstance(exc, ValueError) else row("raises", f"accelerate: {_short(exc)}")
    try:
        fast, exc = _attempt(lambda: _generate_all(model, prompts, pad))
    finally:
        hf_turbo.restore(model)
    if exc is not None:
        return row("raises", f"generate: {_short(exc)}")
    divergences = []
    for i, ((prompt, s_new), (_, t_new)) in enumerate(zip(stock, fast)):
        s_new, t_new = _trim(s_new, pad), _trim(t_new, pad)
        if s_new != t_new:
            divergences.append(explain_divergence(model, prompt, s_new, t_new, row=i))
    if not divergences:
        return row("identical")
    first = divergences[0]
    where = f"row {first.row} token {first.position}: stock {first.stock_token}, hf_turbo {first.turbo_token}"
    gap = f"top-2 gap {first.top2_gap:.3g}" if first.top2_gap is not None else "no gap"
    if all(d.near_tie for d in divergences):
        return row("near-tie", f"{len(divergences)} row(s); {where} ({gap})")
    return row("wrong", f"{len(divergences)} row(s); {where} ({gap})")


@contextmanager
def _memory_cap(extra: int) -> Iterator[None]:
    """Cap the process's address space at its current size + ``extra`` bytes (Linux; elsewhere no cap)."""
    try:
        import resource

        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (ImportError, OSError, StopIteration):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + extra if hard == resource.RLIM_INFINITY else min(vm + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_sweep(model_types: list[str] | None = None, seed: int = 0, progress: bool = False) -> list[RegistryRow]:
    """:func:`check_model_type` for ``model_types`` (default: the whole registry), in order."""
    from transformers.utils import logging as hf_logging

    from hf_turbo.testing.registry import registry_model_types

    types = list(model_types) if model_types is not None else registry_model_types()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # small configs make many families warn about their own settings
    rows = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t in types:
                with _memory_cap(MEMORY_CAP_BYTES):
                    rows.append(check_model_type(t, seed))
                if progress:
                    r = rows[-1]
                    print(f"{r.model_type:28s} {r.result:13s} {r.seconds:6.2f}s {r.detail[:100]}", flush=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    return rows


def format_registry_table(rows: list[RegistryRow]) -> str:
    """A markdown table of every row, then the counts per result."""
    import transformers

    lines = ["| model_type | result | detail |", "|---|---|---|"]
    for r in rows:
        detail = r.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.model_type} | {r.result} | {detail[:220]} |")
    counts = Counter(r.result for r in rows)
    lines.append("")
    lines.append(f"transformers {transformers.__version__}, torch {torch.__version__}: {len(rows)} model types; "
                 + ", ".join(f"{counts.get(k, 0)} {k}" for k in RESULTS))
    return "\n".join(lines)
