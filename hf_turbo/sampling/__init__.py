"""Sampling: ``SamplingParams`` and the batched, keyed sampler.

``params`` (what a request asks for), ``processors`` (penalties, bias, EOS suppression, hook,
temperature), ``filters`` (top-k/top-p/min-p with transformers' kept set, through candidates),
``noise`` (Gumbel noise keyed by (seed, position, token id)), ``sampler`` (``sample``).
"""

from __future__ import annotations

from hf_turbo.sampling.noise import keyed_gumbel, keyed_uniform, row_keys
from hf_turbo.sampling.params import RowState, SamplingParams, random_seed, validate_vocab
from hf_turbo.sampling.sampler import SampleResult, process_logits, sample

__all__ = ["SamplingParams", "RowState", "SampleResult", "sample", "process_logits", "random_seed",
           "validate_vocab", "keyed_gumbel", "keyed_uniform", "row_keys"]
