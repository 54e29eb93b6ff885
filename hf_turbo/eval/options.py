"""EvalOptions: what one ``hf-turbo eval`` run covers (frozen, validated with ValueError)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hf_turbo.eval.axes import ALL_FLAGS, AXIS_FLAGS

__all__ = ["EvalOptions", "QUICK_ARCHS", "DEFAULT_NUM_PROMPTS", "REGISTRY_ARCH", "registry_types"]

QUICK_ARCHS = ("gpt2", "gemma2", "qwen3")  # learned positions; softcap + sliding window; qk-norm
DEFAULT_NUM_PROMPTS = 16
REGISTRY_ARCH = "registry"  # --arch registry[=type,...]: the sweep of hf_turbo.eval.registry


def registry_types(spec: str) -> list[str] | None:
    """The model types of ``--arch registry[=a,b]``: None for the whole registry, else the listed ones
    (ValueError naming any that transformers has no causal-LM head for)."""
    from hf_turbo.testing.registry import registry_model_types

    name, _, listed = spec.partition("=")
    if name.strip() != REGISTRY_ARCH:
        raise ValueError(f"--arch {spec!r} is not '{REGISTRY_ARCH}' or '{REGISTRY_ARCH}=type,...'")
    types = [t.strip() for t in listed.split(",") if t.strip()]
    if not listed.strip():
        return None
    known = set(registry_model_types())
    unknown = [t for t in types if t not in known]
    if unknown:
        raise ValueError(f"--arch {REGISTRY_ARCH}=...: {unknown[0]!r} is not a causal-LM model_type of this "
                         "transformers (see MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)")
    return types
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}


@dataclass(frozen=True)
class EvalOptions:
    """One eval run.

    ``archs`` lists "fixture" (the trained fixture model) and/or transformers model types, built as
    tiny random-weight models (``hf_turbo.testing.tiny_model``); ``model`` adds a local model
    directory. ``axes`` are ``--axes`` flags (see ``hf_turbo.eval.axes.AXIS_FLAGS``).
    ``num_prompts`` None means 16 built-in prompts, or every prompt of the ``prompts`` file.
    """

    archs: tuple[str, ...] = ("fixture",)
    model: str | None = None
    draft_model: str | None = None
    prompts: str | None = None
    axes: tuple[str, ...] = ALL_FLAGS
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    num_prompts: int | None = None
    max_new_tokens: int = 32
    max_prompt_tokens: int = 160
    seed: int = 0
    cache_dir: str | None = None
    out: str | None = None
    threads: int | None = 1  # correctness, not speed: one thread never oversubscribes a shared CPU
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("archs", "axes", "dtypes"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            object.__setattr__(self, name, tuple(value))
        if "all" in self.archs:  # every architecture the test-suite builds, where "all" stands
            from hf_turbo.testing import TINY_ARCHS

            i = self.archs.index("all")
            expanded = self.archs[:i] + TINY_ARCHS + self.archs[i + 1:]
            object.__setattr__(self, "archs", tuple(dict.fromkeys(expanded)))
        if not self.archs and self.model is None:
            raise ValueError("nothing to evaluate: give --arch and/or --model")
        dtypes = []
        for d in self.dtypes:
            if d not in _DTYPE_NAMES:
                raise ValueError(f"dtype must be one of {sorted(set(_DTYPE_NAMES.values()))}, got {d!r}")
            dtypes.append(_DTYPE_NAMES[d])
        if not dtypes:
            raise ValueError("--dtypes is empty")
        object.__setattr__(self, "dtypes", tuple(dict.fromkeys(dtypes)))
        unknown = [a for a in self.axes if a not in AXIS_FLAGS]
        if unknown or not self.axes:
            raise ValueError(f"unknown axis {unknown[0] if unknown else ''!r}; choose from {', '.join(AXIS_FLAGS)}")
        for name, low in (("num_prompts", 1), ("max_new_tokens", 1), ("max_prompt_tokens", 1), ("threads", 1)):
            v = getattr(self, name)
            if v is None and name in ("num_prompts", "threads"):  # threads None: torch's choice
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    @classmethod
    def quick(cls, **overrides) -> EvalOptions:
        """The fixture and three tiny architectures, 6 prompts, 8 new tokens: a couple of minutes on a CPU."""
        base = {"archs": ("fixture",) + QUICK_ARCHS, "num_prompts": 6, "max_new_tokens": 8}
        base.update(overrides)
        return cls(**base)

    def replace(self, **overrides) -> EvalOptions:
        return dataclasses.replace(self, **overrides)

    @property
    def resolved_num_prompts(self) -> int | None:
        """Prompts to take: the given number, else all of a file, else the built-in default."""
        if self.num_prompts is not None:
            return self.num_prompts
        return None if self.prompts else DEFAULT_NUM_PROMPTS
