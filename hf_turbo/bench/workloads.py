"""Benchmark workloads: fixed-seed request sets whose prompts are real token ids.

Prompts are slices of one token stream made from the Python standard library's own source files
(``sysconfig.get_paths()["stdlib"]``), so every machine has the text and nothing is downloaded.
The same seed and tokenizer give the same prompts on the same Python version.
"""

from __future__ import annotations

import logging
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Workload", "WORKLOAD_NAMES", "build_workloads", "corpus_token_ids"]

logger = logging.getLogger(__name__)

WORKLOAD_NAMES = ("W1", "W2", "W3")

# Enough text for W3's 1,024-token prefix plus 64 requests of up to 512 tokens with little overlap.
_CORPUS_CHARS = 200_000


@dataclass(frozen=True)
class Workload:
    """One set of requests, run identically by every path.

    Attributes:
        name: short id (``"W1"``).
        description: one line for the report.
        prompts: token ids of each request's prompt.
        output_lens: exact number of new tokens each request must generate.
        repeats: times each path runs the workload; the median wall time is reported (W2 uses 3).
    """

    name: str
    description: str
    prompts: tuple[tuple[int, ...], ...]
    output_lens: tuple[int, ...]
    repeats: int = 1

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.output_lens):
            raise ValueError(
                f"workload {self.name!r}: {len(self.prompts)} prompts but "
                f"{len(self.output_lens)} output lengths"
            )
        if not self.prompts:
            raise ValueError(f"workload {self.name!r} has no requests")
        if any(len(p) == 0 for p in self.prompts):
            raise ValueError(f"workload {self.name!r} has an empty prompt")
        if any(n < 1 for n in self.output_lens):
            raise ValueError(f"workload {self.name!r}: output lengths must be >= 1, got {self.output_lens}")
        if self.repeats < 1:
            raise ValueError(f"workload {self.name!r}: repeats must be >= 1, got {self.repeats}")

    @property
    def n_requests(self) -> int:
        return len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def requested_tokens(self) -> int:
        """Sum of the requested output lengths: what every path must generate, no more, no less."""
        return sum(self.output_lens)

    @property
    def max_total_len(self) -> int:
        """Longest prompt + output of any request (must fit the model's positions)."""
        return max(len(p) + n for p, n in zip(self.prompts, self.output_lens, strict=True))

    def warmup(self) -> Workload:
        """A tiny untimed version: the first two requests, short prompts, 4 new tokens each."""
        prompts = tuple(p[:16] for p in self.prompts[:2])
        return Workload(f"{self.name}-warmup", "warm-up", prompts, tuple(4 for _ in prompts))

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (lengths only, not token ids)."""
        return {
            "name": self.name,
            "description": self.description,
            "n_requests": self.n_requests,
            "repeats": self.repeats,
            "prompt_tokens": self.prompt_tokens,
            "requested_tokens": self.requested_tokens,
            "prompt_lens": [len(p) for p in self.prompts],
            "output_lens": list(self.output_lens),
        }


def _stdlib_text(max_chars: int = _CORPUS_CHARS) -> str:
    """Concatenated source of the stdlib's top-level ``.py`` files, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not parts:
        raise ValueError(f"no Python source found in the stdlib directory {root}")
    return "\n".join(parts)[:max_chars]


def corpus_token_ids(tokenizer: Any, max_chars: int = _CORPUS_CHARS) -> list[int]:
    """Token ids of the stdlib text under ``tokenizer`` (no special tokens)."""
    # verbose=False: the corpus is far longer than model_max_length on purpose (it is sliced below)
    ids = tokenizer(_stdlib_text(max_chars), add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < 2048:
        raise ValueError(f"stdlib corpus tokenized to only {len(ids)} tokens; need at least 2048")
    return list(ids)


def _slice(corpus: list[int], length: int, rng: random.Random) -> tuple[int, ...]:
    start = rng.randrange(0, len(corpus) - length)
    return tuple(corpus[start : start + length])


def _offline(
    corpus: list[int], rng: random.Random, n: int, prompt: tuple[int, int], out: tuple[int, int]
) -> Workload:
    prompts = tuple(_slice(corpus, rng.randint(*prompt), rng) for _ in range(n))
    outs = tuple(rng.randint(*out) for _ in range(n))
    desc = f"offline throughput: {n} requests, prompts {prompt[0]}-{prompt[1]}, outputs {out[0]}-{out[1]}"
    return Workload("W1", desc, prompts, outs)


def _latency(corpus: list[int], rng: random.Random, prompt: int, out: int) -> Workload:
    desc = f"batch-1 latency: 1 request, prompt {prompt}, output {out}, median of 3"
    return Workload("W2", desc, (_slice(corpus, prompt, rng),), (out,), repeats=3)


def _shared_prefix(
    corpus: list[int], rng: random.Random, n: int, prefix_len: int, suffix: tuple[int, int], out: int
) -> Workload:
    prefix = _slice(corpus, prefix_len, rng)
    prompts = tuple(prefix + _slice(corpus, rng.randint(*suffix), rng) for _ in range(n))
    desc = (
        f"shared prefix: {n} requests, {prefix_len}-token prefix + {suffix[0]}-{suffix[1]} suffix, "
        f"output {out}"
    )
    return Workload("W3", desc, prompts, tuple(out for _ in range(n)))


def build_workloads(
    tokenizer: Any, names: list[str], *, quick: bool = False, seed: int = 0
) -> list[Workload]:
    """Build the named workloads (subset of ``WORKLOAD_NAMES``), full size or ``quick``.

    Each workload draws from its own ``random.Random(seed + index)`` so selecting a subset does not
    change the prompts of the others.
    """
    unknown = [n for n in names if n not in WORKLOAD_NAMES]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; choose from {list(WORKLOAD_NAMES)}")
    corpus = corpus_token_ids(tokenizer)
    logger.info("workload corpus: %d stdlib tokens", len(corpus))
    workloads = []
    for name in names:
        rng = random.Random(seed * 1000 + WORKLOAD_NAMES.index(name))
        if name == "W1":
            args = (8, (16, 64), (8, 32)) if quick else (64, (32, 512), (32, 256))
            workloads.append(_offline(corpus, rng, *args))
        elif name == "W2":
            workloads.append(_latency(corpus, rng, 32, 32) if quick else _latency(corpus, rng, 128, 128))
        else:
            args3 = (4, 128, (16, 32), 8) if quick else (32, 1024, (16, 64), 32)
            workloads.append(_shared_prefix(corpus, rng, *args3))
    return workloads
