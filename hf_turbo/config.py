"""Frozen, validated configuration: TurboConfig (engine), CacheConfig (paged KV cache)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CacheConfig", "TurboConfig"]

_BACKENDS = ("auto", "triton", "reference")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing.

    ``num_blocks`` wins when given. Otherwise the pool takes ``gpu_memory_fraction`` of the free
    device memory on CUDA, or ``cpu_kv_bytes`` on the CPU.
    """

    block_size: int = 16
    num_blocks: int | None = None
    gpu_memory_fraction: float = 0.85
    cpu_kv_bytes: int = 512 * 1024 * 1024
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"CacheConfig.block_size must be a power of two >= 1, got {self.block_size!r}")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise ValueError(f"CacheConfig.num_blocks must be an integer >= 1 or None, got {self.num_blocks!r}")
        if not (0.0 < self.gpu_memory_fraction <= 1.0):
            raise ValueError(f"CacheConfig.gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction!r}")
        if not isinstance(self.cpu_kv_bytes, int) or self.cpu_kv_bytes < 1:
            raise ValueError(f"CacheConfig.cpu_kv_bytes must be a positive integer, got {self.cpu_kv_bytes!r}")


@dataclass(frozen=True)
class TurboConfig:
    """Engine configuration.

    ``max_num_batched_tokens`` is the token budget of one step (decode tokens plus prefill
    chunks); prompts longer than it are prefilled in chunks. ``max_num_seqs`` caps the running
    batch. ``debug_checks`` runs the block-pool invariant check after every step.
    """

    cache: CacheConfig = field(default_factory=CacheConfig)
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_waiting: int | None = None
    backend: str = "auto"
    debug_checks: bool = False

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
