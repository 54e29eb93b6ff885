"""Speculative decoding: proposers (n-gram lookup, draft model), the adaptive k, verification.

Turn it on with ``TurboConfig(speculative=SpeculativeConfig(...))``; ``generate(assistant_model=...)``
and ``generate(prompt_lookup_num_tokens=...)`` on an accelerated model use it too. Output is
token-for-token the output without speculation (greedy and seeded sampling alike).
"""

from __future__ import annotations

from hf_turbo.config import SpeculativeConfig
from hf_turbo.engine.spec.adaptive import AdaptiveK, expected_tokens
from hf_turbo.engine.spec.decoder import SpecDecoder, num_accepted
from hf_turbo.engine.spec.proposers import DraftModelProposer, NgramProposer, validate_draft

__all__ = ["AdaptiveK", "DraftModelProposer", "NgramProposer", "SpecDecoder", "SpeculativeConfig",
           "expected_tokens", "num_accepted", "validate_draft"]
