"""The models ``hf-turbo eval`` runs on: the fixture, tiny architectures, or a user's local directory."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from hf_turbo.loading import load_model_and_tokenizer, parse_dtype

logger = logging.getLogger(__name__)

__all__ = ["EvalModel", "load_eval_model", "check_model_dir"]


@dataclass
class EvalModel:
    name: str
    model: Any
    tokenizer: Any
    draft_loader: Callable[[], Any] | None  # None: no draft model for the spec_draft axis


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@cache
def _fixture_tokenizer():
    from transformers import AutoTokenizer

    from hf_turbo.testing import fixture_path

    return AutoTokenizer.from_pretrained(fixture_path("target"))


def check_model_dir(path: str, what: str = "--model") -> Path:
    """A local decoder-only model directory, or ValueError saying what is wrong with it."""
    from transformers import AutoConfig

    from hf_turbo.testing.tiny import _check_decoder

    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"{what} {str(path)!r} does not exist (hf-turbo eval takes a local model directory)")
    if not p.is_dir():
        raise ValueError(f"{what} {str(path)!r} is not a directory (expected a local Hugging Face model dir)")
    if not (p / "config.json").is_file():
        raise ValueError(f"{what} {str(path)!r} has no config.json: not a transformers model directory")
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True)
    except Exception as exc:  # a broken config.json: name the dir, not a deep traceback
        raise ValueError(f"{what} {str(path)!r}: config.json could not be read ({type(exc).__name__}: {exc})") \
            from exc
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{what} {str(path)!r} is an encoder-decoder model (model_type={config.model_type!r}); "
                         "hf_turbo evaluates decoder-only causal LMs")
    try:
        _check_decoder(config.model_type)
    except ValueError as exc:
        raise ValueError(f"{what} {str(path)!r}: {exc}") from None
    return p


def _load_dir(path: Path, dtype: str, what: str) -> tuple[Any, Any]:
    try:
        return load_model_and_tokenizer(str(path), dtype=dtype, device=_device(), attn_implementation=None)
    except ValueError:
        raise
    except Exception as exc:  # missing tokenizer or weights: name the dir
        raise ValueError(f"{what} {str(path)!r} could not be loaded ({type(exc).__name__}: {exc})") from exc


def load_eval_model(spec: str, dtype: str, draft_model: str | None = None) -> EvalModel:
    """``spec``: "fixture", a transformers model type (a tiny random model with the fixture's
    tokenizer) or "path:DIR" (a local model with its own tokenizer; ``draft_model`` its draft)."""
    torch_dtype = parse_dtype(dtype)
    if spec == "fixture":
        model, tok = load_model_and_tokenizer(None, dtype=dtype, device=_device(), attn_implementation=None)

        def draft() -> Any:
            return load_model_and_tokenizer("fixture:draft", dtype=dtype, device=_device(),
                                            attn_implementation=None)[0]

        return EvalModel("fixture", model, tok, draft)
    if spec.startswith("path:"):
        path = check_model_dir(spec[5:])
        model, tok = _load_dir(path, dtype, "--model")
        loader = None
        if draft_model is not None:
            dpath = check_model_dir(draft_model, "--draft-model")

            def loader() -> Any:
                return _load_dir(dpath, dtype, "--draft-model")[0]

        return EvalModel(path.name or str(path), model, tok, loader)
    from hf_turbo.testing import tiny_model

    tok = _fixture_tokenizer()
    vocab = len(tok)
    model = tiny_model(spec, dtype=torch_dtype, vocab_size=vocab).to(_device())

    def tiny_draft() -> Any:
        return tiny_model(spec, seed=1, dtype=torch_dtype, vocab_size=vocab).to(_device())

    return EvalModel(spec, model, tok, tiny_draft)
