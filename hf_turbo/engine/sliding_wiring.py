"""Wiring a cache's sliding-window release (``cache/sliding.py``) into an engine's scheduler and hooks."""

from __future__ import annotations

from hf_turbo.cache.sliding import SlidingBlocks
from hf_turbo.engine.memory import SlidingPlan

__all__ = ["sliding_blocks", "wire_sliding"]


def sliding_blocks(plan: SlidingPlan | None, pool, max_num_batched_tokens: int) -> SlidingBlocks | None:
    """The block map of ``plan`` over the engine's ``pool`` (None: no release)."""
    if plan is None:
        return None
    return SlidingBlocks(pool, plan.num_blocks, plan.num_physical, plan.window, plan.layers, max_num_batched_tokens)


def wire_sliding(engine) -> None:
    """Hook ``engine.cache.sliding`` (if any) into the scheduler: holds let go with a request's blocks, prefix
    hits cut to what the sliding layers still hold, and no more running requests than their blocks cover."""
    sliding = engine.cache.sliding
    if sliding is None:
        return
    scheduler = engine.scheduler
    release = scheduler.on_release

    def on_release(req) -> None:
        sliding.release(req)
        if release is not None:
            release(req)

    def on_prefix_hit(req, blocks: list[int]) -> int:
        keep = sliding.usable_prefix(blocks)
        sliding.adopt(req, blocks[:keep], keep * sliding.block_size)
        return keep

    scheduler.on_release = on_release
    scheduler.on_prefix_hit = on_prefix_hit
    scheduler.max_running = sliding.max_running
