"""Loading a model and tokenizer by path, hub id or the built-in fixture name, with clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["resolve_model_path", "load_model_and_tokenizer", "parse_dtype", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"bf16"``/... or a torch dtype -> torch dtype (ValueError naming the value)."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def resolve_dtype(name: str | torch.dtype, config, device: str | torch.device) -> torch.dtype:
    """``"auto"`` -> the dtype to load ``config``'s checkpoint in on ``device``; anything else as :func:`parse_dtype`.

    On CUDA: the checkpoint's dtype (``config.dtype``/``torch_dtype``), except that a float32 (or
    unrecorded) checkpoint loads as bfloat16 (one log line): half the memory and bandwidth. On the
    CPU: float32 always, because the exactness contract is stated in float32 and this CPU path has no
    fast bfloat16 kernels.
    """
    if not (isinstance(name, str) and name.lower() == "auto"):
        return parse_dtype(name)
    if torch.device(device).type != "cuda":
        return torch.float32
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    try:
        saved = parse_dtype(saved) if saved is not None else torch.float32
    except ValueError:  # float64, int8 and the like: not a serving dtype
        saved = torch.float32
    if saved == torch.float32:
        logger.info("dtype auto: the float32 checkpoint loads as bfloat16 on CUDA (pass --dtype float32 to keep it)")
        return torch.bfloat16
    return saved


def resolve_model_path(model: str | Path | None) -> str:
    """Map ``None``/``"fixture"``/``"fixture:draft"`` to the fixture dirs; check local paths exist.

    A string that is not an existing directory is accepted only if it looks like a hub id
    (``owner/name``, no leading ``.``/``/``); anything else is a ValueError naming it.
    """
    from hf_turbo.testing import fixture_path

    if model is None or str(model) in ("fixture", "fixture:target"):
        return str(fixture_path("target"))
    if str(model) == "fixture:draft":
        return str(fixture_path("draft"))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model path {str(model)!r} has no config.json: not a transformers model dir")
        return str(path)
    text = str(model)
    looks_like_hub_id = (
        text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.suffix
    )
    if path.exists() or not looks_like_hub_id:
        raise ValueError(f"model path {text!r} does not exist or is not a directory")
    return text


def load_model_and_tokenizer(
    model: str | Path | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    tp_plan: str | None = None,
):
    """Load ``(model, tokenizer)`` in eval mode. ``model`` as in :func:`resolve_model_path`.

    ``dtype`` as in :func:`resolve_dtype` (default ``"auto"``); the weights load straight onto
    ``device`` (default: CUDA if available), never staged on the CPU first. ``tp_plan="auto"``: this
    rank's shard of a tensor-parallel model (torch.distributed initialized; the device is the rank's).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    name = resolve_model_path(model)
    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model {name!r} (model_type={config.model_type!r}) is an encoder-decoder; "
                         "hf_turbo runs decoder-only causal LMs")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch_dtype = resolve_dtype(dtype, config, device)
    kwargs = {"dtype": torch_dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code,
              "device_map": str(device)}
    if tp_plan is not None:  # transformers places each rank's shard itself
        del kwargs["device_map"]
        kwargs["tp_plan"] = tp_plan
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    lm = AutoModelForCausalLM.from_pretrained(name, **kwargs).eval()
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    logger.info("loaded %s (%s, %s, %s)", name, config.model_type, torch_dtype, device)
    return lm, tok
