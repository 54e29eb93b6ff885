"""One request's state: WAITING -> RUNNING -> (PREEMPTED -> RUNNING) -> FINISHED | ABORTED."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hf_turbo.cache.block_pool import hash_block_tokens
from hf_turbo.sampling import SamplingParams

if TYPE_CHECKING:
    from hf_turbo.engine.stops import StopStringMatcher
    from hf_turbo.grammar.state import GrammarState

__all__ = ["Request", "RequestStatus", "RequestOutput", "check_kv_import", "encode_prompt", "eos_ids"]


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass
class RequestOutput:
    """A finished (or streaming) request, HF/vLLM style."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[dict[int, float]] | None = None
    time_to_first_token: float | None = None
    total_time: float | None = None
    num_cached_tokens: int = 0
    scores: list[torch.Tensor] | None = None
    raw_logits: list[torch.Tensor] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    """Token ids, KV blocks and progress of one sequence.

    Invariant while RUNNING: the KV of ``token_ids[:num_computed]`` is in ``block_ids``. A step
    computes ``token_ids[num_computed : num_computed + n]``; when that reaches ``len(token_ids)``
    the step samples the next token. ``spec_tokens`` are proposed tokens that one step computes
    after ``token_ids`` to verify them; they live only within that step and never enter
    ``token_ids`` (nor the prefix-cache hashes) unless accepted.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    eos_ids: tuple[int, ...] = ()
    arrival: float = field(default_factory=time.perf_counter)
    status: RequestStatus = RequestStatus.WAITING
    token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached_tokens: int = 0
    block_hashes: list[bytes] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    error: BaseException | None = None
    stop_checker: Callable[[list[int]], bool] | None = None  # extra stop rule on the output ids
    stop_matcher: StopStringMatcher | None = None  # stop strings over the output ids (engine, params.stop)
    scores: list[torch.Tensor] | None = None  # processed scores per token (HF output_scores)
    raw_logits: list[torch.Tensor] | None = None  # raw logits per token (HF output_logits)
    spec_tokens: list[int] = field(default_factory=list)  # proposals verified by this step (speculation)
    # generate()'s extra HF processors for this row: scores [1, V] -> scores, before the warpers
    logits_hook: Callable[[torch.Tensor], torch.Tensor] | None = None
    # called with the request when it finishes, while its blocks still hold its K/V
    on_finish: Callable[[Request], None] | None = None
    # K/V of the first prompt positions given by the caller (per layer, [m, H_kv, D]): written into the
    # request's blocks at admission instead of computed; such a request neither reads nor feeds the
    # prefix cache, whose hashes stand for K/V computed from the tokens alone
    kv_import: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    no_prefix_cache: bool = False
    # per-token model inputs of the prompt beyond its ids (generate()'s token_type_ids [L], inputs_embeds
    # [L, H]); such a request neither reads nor feeds the prefix cache either
    model_inputs: dict[str, torch.Tensor] | None = None
    grammar: GrammarState | None = None  # structured output: advanced by accepted tokens only

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []
        if self.kv_import is not None or self.model_inputs:
            self.no_prefix_cache = True

    @property
    def num_imported(self) -> int:
        """Prompt positions whose K/V the caller gave (0 without an imported cache)."""
        return 0 if self.kv_import is None else self.kv_import[0][0].shape[0]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def is_finished(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.ABORTED)

    def full_block_hashes(self, block_size: int) -> list[bytes]:
        """Chained hashes of every full block of ``token_ids`` (extends the memo incrementally)."""
        n_full = len(self.token_ids) // block_size
        while len(self.block_hashes) < n_full:
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else None
            self.block_hashes.append(hash_block_tokens(parent, self.token_ids[i * block_size:(i + 1) * block_size]))
        return self.block_hashes[:n_full]

    def reusable_prefix_hashes(self, block_size: int) -> list[bytes]:
        """Hashes of the full blocks a cache hit may cover: never the block of the last token, which
        must be computed for its logits."""
        return self.full_block_hashes(block_size)[:(self.num_tokens - 1) // block_size]

    def to_output(self, text: str | None = None) -> RequestOutput:
        ttft = None if self.first_token_time is None else self.first_token_time - self.arrival
        total = None if self.finish_time is None else self.finish_time - self.arrival
        return RequestOutput(self.request_id, list(self.prompt_ids), list(self.output_ids), text,
                             self.finish_reason, self.logprobs, ttft, total, self.num_cached_tokens,
                             self.scores, self.raw_logits)


def check_kv_import(kv_import, prompt_len: int, cache) -> None:
    """ValueError unless ``kv_import`` (``Engine.add_request``) gives every layer of ``cache`` the K/V of 1 to
    ``prompt_len - 1`` positions (and ``cache`` keeps every layer's blocks)."""
    num_layers = len(cache.key_pools)
    if cache.sliding is not None:
        raise ValueError("kv_import needs every layer's blocks: CacheConfig(sliding_release=False)")
    if not isinstance(kv_import, (list, tuple)) or len(kv_import) != num_layers:
        raise ValueError(f"kv_import must hold one (key, value) pair per layer ({num_layers})")
    m = kv_import[0][0].shape[0]
    if not 0 < m < prompt_len:
        raise ValueError(f"kv_import covers {m} positions; it must cover 1 to {prompt_len - 1} (the prompt "
                         "length minus the last position, whose logits are computed)")
    for k, v in kv_import:
        if k.dim() != 3 or k.shape != v.shape or k.shape[0] != m:
            raise ValueError(f"kv_import entries must be [m, H_kv, D] pairs of one shape, got {tuple(k.shape)} "
                             f"and {tuple(v.shape)}")


def encode_prompt(prompt, tokenizer, vocab_size: int) -> list[int]:
    """A prompt (text, token ids or a tensor of them) as checked token ids; ValueError naming what is wrong."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("prompt is a string but the Engine has no tokenizer; pass token ids")
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    elif isinstance(prompt, torch.Tensor):
        ids = prompt.reshape(-1).tolist()
    else:
        ids = list(prompt)
    if not ids:
        raise ValueError("prompt is empty: it must hold at least one token")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int):
            raise ValueError(f"prompt token ids must be integers, got {t!r}")
        if t < 0 or t >= vocab_size:
            raise ValueError(f"prompt token id {t} is out of the vocabulary [0, {vocab_size})")
    return ids


def eos_ids(model) -> tuple[int, ...]:
    """The model's EOS ids (its generation config's, else its config's)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
