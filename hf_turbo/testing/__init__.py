"""Models to test on without any download: tiny random-weight models and the trained fixture pair."""

from __future__ import annotations

from pathlib import Path

from hf_turbo.testing.tiny import TINY_ARCHS, tiny_config, tiny_model

__all__ = ["fixture_path", "FIXTURE_NAMES", "TINY_ARCHS", "tiny_config", "tiny_model"]

FIXTURE_NAMES = ("target", "draft")
_FIXTURE_ROOT = Path(__file__).parent / "fixtures"


def fixture_path(name: str = "target") -> Path:
    """Local directory of the trained fixture model ``"target"`` or ``"draft"``.

    Both load offline with ``AutoModelForCausalLM.from_pretrained(path)`` and
    ``AutoTokenizer.from_pretrained(path)``; they share one tokenizer.
    """
    if name not in FIXTURE_NAMES:
        raise ValueError(f"fixture name must be one of {FIXTURE_NAMES}, got {name!r}")
    path = _FIXTURE_ROOT / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"fixture {name!r} not found at {path}; train it with "
            "`python -m hf_turbo.testing.train_fixture`"
        )
    return path
