"""The continuous-batching engine and its asyncio front."""

from __future__ import annotations

from hf_turbo.engine.async_engine import AsyncEngine, EngineOverloaded, StreamOutput

__all__ = ["AsyncEngine", "EngineOverloaded", "StreamOutput"]
