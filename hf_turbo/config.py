"""Frozen, validated configuration: TurboConfig (engine), CacheConfig (paged KV cache),
SpeculativeConfig (speculative decoding)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["KV_DTYPES", "CacheConfig", "SpeculativeConfig", "TurboConfig"]

_BACKENDS = ("auto", "triton", "reference", "cpu")
_SPEC_METHODS = ("draft", "ngram")
KV_DTYPES = ("auto", "int8", "fp8_e4m3", "fp8_e5m2")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing.

    ``num_blocks`` wins when given. Otherwise on CUDA the pool takes what is left of
    ``gpu_memory_fraction`` of the device's total memory after what is in use (weights, context) and
    the peak of a profiling forward at the step token budget (``engine/memory.py``); on the CPU it
    takes ``cpu_kv_bytes``; capped at twice the blocks that
    ``max_num_seqs`` sequences of the model's maximum length need. On the CPU the running sequences
    also keep a contiguous copy of their K/V (the CPU backend, ``backends/cpu/rows.py``): up to as much memory again
    as their blocks hold, allocated as they grow and freed when they finish.

    ``kv_dtype``: ``"auto"`` (default) stores K/V in the model's dtype; ``"int8"``, ``"fp8_e4m3"`` and
    ``"fp8_e5m2"`` store 8-bit values with a float32 scale per (token, KV head) (``backends/kv_quant.py``):
    about 2x the blocks of bf16 and 4x of float32 for the same bytes. An 8-bit cache is an explicit
    opt-in that changes the numbers attention sees, so its output is not stock ``generate()``'s token for
    token (``hf-turbo eval`` reports how far it moves); it is exact with respect to itself (prefix caching,
    chunking, preemption and speculation do not change its tokens). On the CPU it runs on the reference
    backend.

    ``sliding_release``: layers whose attention runs within a sliding window keep only the blocks that window
    still reads (``cache/sliding.py``): their pools are sized for the running sequences' windows, and the
    memory saved goes to more blocks for the full-attention layers. ``None`` (default): on where the model
    has sliding layers, unless the CPU backend would run it (its contiguous rows keep every position anyway)
    or the model is tensor-parallel; ``True``: on (the reference backend instead of the CPU backend);
    ``False``: off. Output is unchanged either way (the window never reads what is released).
    """

    block_size: int = 16
    num_blocks: int | None = None
    gpu_memory_fraction: float = 0.85
    cpu_kv_bytes: int = 512 * 1024 * 1024
    enable_prefix_caching: bool = True
    kv_dtype: str = "auto"
    sliding_release: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"CacheConfig.block_size must be a power of two >= 1, got {self.block_size!r}")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise ValueError(f"CacheConfig.num_blocks must be an integer >= 1 or None, got {self.num_blocks!r}")
        if not (0.0 < self.gpu_memory_fraction <= 1.0):
            raise ValueError(f"CacheConfig.gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction!r}")
        if not isinstance(self.cpu_kv_bytes, int) or self.cpu_kv_bytes < 1:
            raise ValueError(f"CacheConfig.cpu_kv_bytes must be a positive integer, got {self.cpu_kv_bytes!r}")
        if not isinstance(self.kv_dtype, str) or self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"CacheConfig.kv_dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        if self.sliding_release not in (None, True, False):
            raise ValueError(f"CacheConfig.sliding_release must be None, True or False, got {self.sliding_release!r}")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: a proposer guesses up to ``num_tokens`` tokens, one target forward checks them.

    ``method="draft"`` runs ``draft_model`` (an HF causal LM with the target's vocabulary; its
    ``draft_tokenizer``, when given, must equal the target's); ``method="ngram"`` looks the last
    ``ngram_max``..``ngram_min`` tokens up in the request's own earlier tokens (prompt lookup).
    With ``adaptive`` each request's k follows its measured acceptance (down to not proposing at
    all); speculation pauses while more than ``max_batch_for_spec`` requests run, where decode
    stops being memory-bound and extra verified tokens are no longer free. Output never changes.
    """

    method: str = "ngram"
    draft_model: Any = field(default=None, repr=False, compare=False)
    num_tokens: int = 4
    ngram_max: int = 3
    ngram_min: int = 1
    adaptive: bool = True
    max_batch_for_spec: int = 32
    draft_tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"SpeculativeConfig.{name} {why}, got {getattr(self, name)!r}")

        if self.method not in _SPEC_METHODS:
            bad("method", f"must be one of {_SPEC_METHODS}")
        if self.method == "draft" and self.draft_model is None:
            raise ValueError('SpeculativeConfig.draft_model is required for method="draft"')
        if not _is_int(self.num_tokens) or self.num_tokens < 1:
            bad("num_tokens", "must be an integer >= 1")
        if not _is_int(self.ngram_min) or self.ngram_min < 1:
            bad("ngram_min", "must be an integer >= 1")
        if not _is_int(self.ngram_max) or self.ngram_max < self.ngram_min:
            bad("ngram_max", f"must be an integer >= ngram_min ({self.ngram_min})")
        if not _is_int(self.max_batch_for_spec) or self.max_batch_for_spec < 1:
            bad("max_batch_for_spec", "must be an integer >= 1")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class TurboConfig:
    """Engine configuration.

    ``max_num_batched_tokens`` is the token budget of one step (decode tokens plus prefill
    chunks); prompts longer than it are prefilled in chunks. ``max_num_seqs`` caps the running
    batch. ``debug_checks`` runs the block-pool invariant check after every step. ``speculative``
    turns on speculative decoding (per request it still obeys ``SamplingParams.speculative``).
    ``lean_forward`` lets the engine run stock Llama, Mistral, Qwen2 and Qwen3 models through the
    same ops without transformers' module machinery (``engine/lean.py``; checked bit for bit against
    the model's own forward before the first step); False always calls the model. ``backend``
    picks the attention backend (``hf_turbo.backends``): ``"auto"`` (Triton on CUDA, the CPU backend on
    the CPU), ``"triton"``, ``"reference"`` (torch ops only) or ``"cpu"``; the environment variable
    ``HF_TURBO_BACKEND`` overrides it for a whole process. ``cuda_graphs`` replays decode-only steps as
    CUDA graphs (``engine/graphs.py``): None (default) turns them on where they can run (a CUDA model on the
    Triton backend with the lean forward, one process), True asks for them and raises ValueError where they
    cannot run, False keeps every step eager. ``async_scheduling`` queues a plain decode step before the
    previous one's sampled tokens reach the host (``engine/lookahead.py``; same tokens): None (default) turns it on
    where decode steps run as CUDA graphs, True wherever the graph sampler takes a step (ValueError with
    speculation or tensor parallelism), False never.
    """

    cache: CacheConfig = field(default_factory=CacheConfig)
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_waiting: int | None = None
    backend: str = "auto"
    debug_checks: bool = False
    speculative: SpeculativeConfig | None = None
    lean_forward: bool = True
    cuda_graphs: bool | None = None
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.cache, CacheConfig):
            raise ValueError(f"TurboConfig.cache must be a CacheConfig, got {type(self.cache).__name__}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TurboConfig.{name} must be an integer >= 1, got {v!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ValueError(f"TurboConfig.max_model_len must be an integer >= 1 or None, got {self.max_model_len!r}")
        if self.max_waiting is not None and (not isinstance(self.max_waiting, int) or self.max_waiting < 1):
            raise ValueError(f"TurboConfig.max_waiting must be an integer >= 1 or None, got {self.max_waiting!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"TurboConfig.backend must be one of {_BACKENDS}, got {self.backend!r}")
        for name in ("debug_checks", "lean_forward"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TurboConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("cuda_graphs", "async_scheduling"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"TurboConfig.{name} must be True, False or None, got {getattr(self, name)!r}")
        if self.speculative is not None and not isinstance(self.speculative, SpeculativeConfig):
            raise ValueError(f"TurboConfig.speculative must be a SpeculativeConfig or None, "
                             f"got {type(self.speculative).__name__}")

    def replace(self, **overrides) -> TurboConfig:
        """A copy with fields replaced; ``block_size=``/``num_blocks=``/... go to the cache config."""
        import dataclasses

        cache_fields = {f.name for f in dataclasses.fields(CacheConfig)}
        cache_over = {k: overrides.pop(k) for k in list(overrides) if k in cache_fields}
        own = {f.name for f in dataclasses.fields(TurboConfig)}
        unknown = sorted(set(overrides) - own)
        if unknown:
            raise ValueError(f"unknown TurboConfig option(s): {', '.join(unknown)}")
        cache = dataclasses.replace(self.cache, **cache_over) if cache_over else self.cache
        return dataclasses.replace(self, cache=cache, **overrides)
