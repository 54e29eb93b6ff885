"""Model shapes the package ships (configs only, no weights): random-weight models of real sizes.

``build(name)`` makes the model from ``<name>.json`` (the published config's architecture fields) with
seeded random weights, then scales the output embedding so the logits' standard deviation across the
vocabulary is ``LOGIT_STD``: random weights give nearly flat logits (std ~0.6), which no trained model
has, and flat logits make top-p keep most of the vocabulary. 4.5 is the trained fixture's figure
(``hf_turbo.testing``: std 4.5, mean top-1 probability 0.41 on stdlib source). Prompts are token ids:
``WordIds`` maps each word of the workload text to a fixed id, so there is no tokenizer to download.
"""

from __future__ import annotations

import json
import zlib
from importlib import resources
from typing import Any

import torch

__all__ = ["LOGIT_STD", "SHAPES", "WordIds", "build", "shape_config"]

LOGIT_STD = 4.5
SHAPES = ("smollm2-135m", "qwen3-0.6b", "llama3.2-1b", "llama3.1-8b")


def shape_config(name: str, num_layers: int | None = None):
    """The transformers config of shape ``name`` (ValueError naming ``--shape`` for an unknown one)."""
    from transformers import AutoConfig

    if name not in SHAPES:
        raise ValueError(f"--shape {name!r} is not shipped; choose from {list(SHAPES)}")
    fields = json.loads(resources.files(__package__).joinpath(f"{name}.json").read_text())
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"--shape-layers must be >= 1, got {num_layers}")
        fields["num_hidden_layers"] = num_layers
    fields.pop("architectures", None)
    return AutoConfig.for_model(**fields)


class WordIds:
    """A stand-in tokenizer for token-id prompts: each whitespace-separated word -> one id in
    ``[256, vocab)`` by CRC32 (so repeated words repeat ids, as real text does)."""

    pad_token_id = None
    eos_token_id = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, text: str, add_special_tokens: bool = False, verbose: bool = False) -> dict[str, Any]:
        span = self.vocab_size - 256
        return {"input_ids": [256 + zlib.crc32(w.encode()) % span for w in text.split()]}


@torch.no_grad()
def build(name: str, dtype: torch.dtype, device: torch.device, num_layers: int | None = None,
          seed: int = 0) -> tuple[Any, WordIds]:
    """Random-weight model of shape ``name`` (eval mode, on ``device``) with trained-like logit spread."""
    from transformers import AutoModelForCausalLM

    config = shape_config(name, num_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    head = model.get_output_embeddings()
    if config.tie_word_embeddings:
        # an untied head of its own random values: a scaled copy of the input embedding would make every
        # model predict its input token (e . e dominates)
        model.config.tie_word_embeddings = False
        head.weight = torch.nn.Parameter(torch.randn_like(head.weight) * 0.02, requires_grad=False)
    ids = torch.randint(256, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(seed))
    std = model(ids.to(device)).logits.float().std(dim=-1).mean()
    head.weight.mul_(LOGIT_STD / float(std))
    return model, WordIds(config.vocab_size)
