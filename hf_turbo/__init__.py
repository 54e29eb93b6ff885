"""hf_turbo: fast, exact inference for Hugging Face transformers decoder models.

``hf_turbo.accelerate(model)`` patches a stock ``AutoModelForCausalLM`` in place so that
``model.generate()`` runs on a paged KV cache with Triton kernels (CUDA) or torch references (CPU),
and returns the same tokens as stock generate. ``hf_turbo.restore(model)`` undoes it exactly.
Importing the package registers the "hf_turbo" attention implementation with transformers.
"""

from __future__ import annotations

from hf_turbo.api import accelerate, get_engine, is_accelerated, pipeline, restore
from hf_turbo.config import CacheConfig, SpeculativeConfig, TurboConfig
from hf_turbo.engine.async_engine import AsyncEngine, EngineOverloaded, StreamOutput
from hf_turbo.engine.engine import Engine
from hf_turbo.engine.request import RequestOutput
from hf_turbo.patches.attention import register as _register
from hf_turbo.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = ["accelerate", "restore", "is_accelerated", "get_engine", "Engine", "AsyncEngine", "StreamOutput",
           "EngineOverloaded", "SamplingParams",
           "RequestOutput", "TurboConfig", "CacheConfig", "SpeculativeConfig", "pipeline", "__version__"]

_register()
