"""Sizing the KV pool on CUDA: what the device has left after the weights and a profiling forward; where a
layer-split model's layers (and so their pools) live.

``CacheConfig.gpu_memory_fraction`` (``--gpu-memory-utilization``) is the share of the device's
total memory this process may fill: the weights and everything else already resident, plus the
peak of one forward at the step token budget, plus the KV pool. The pool gets the rest.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from hf_turbo.cache.paged_cache import kv_layout
from hf_turbo.cache.sliding import max_running_for, physical_blocks_for
from hf_turbo.config import TurboConfig
from hf_turbo.engine.distributed import kv_bytes_per_block

logger = logging.getLogger(__name__)

__all__ = ["cuda_kv_budget", "cuda_kv_budgets", "kv_budget_bytes", "layer_devices", "model_max_len", "num_kv_blocks",
           "plan_sliding_release", "profile_forward_peak", "profile_forward_peaks", "split_kv_blocks", "SlidingPlan"]

_GIB = 1 << 30


def kv_budget_bytes(total: int, free: int, forward_peak: int, fraction: float) -> int:
    """Bytes the KV pool may take: ``fraction * total`` minus what is in use and a forward's peak.

    ``total``/``free`` as ``torch.cuda.mem_get_info`` reports them after the weights loaded (the used
    part also counts the CUDA context and other processes), ``forward_peak`` the extra memory a
    forward at the token budget allocates at its peak. ValueError when nothing is left for the pool.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {fraction!r}")
    if total <= 0 or not 0 <= free <= total or forward_peak < 0:
        raise ValueError(f"inconsistent memory reading: total={total}, free={free}, forward_peak={forward_peak}")
    in_use = total - free
    budget = int(total * fraction) - in_use - forward_peak
    if budget <= 0:
        raise ValueError(
            f"gpu_memory_fraction {fraction} leaves no room for the KV cache: {fraction * total / _GIB:.2f} GiB "
            f"allowed, {in_use / _GIB:.2f} GiB in use (weights, context, other processes) and "
            f"{forward_peak / _GIB:.2f} GiB for a forward at the step token budget; raise "
            "--gpu-memory-utilization or lower --max-batch-tokens")
    return budget


@torch.inference_mode()
def profile_forward_peaks(model, num_tokens: int, devices: list[torch.device]) -> dict[torch.device, int]:
    """Peak bytes one plain forward of ``num_tokens`` tokens allocates beyond what is resident, per CUDA device."""
    first = next(model.parameters()).device
    if first.type != "cuda" or any(d.type != "cuda" for d in devices):
        raise ValueError(f"the profiling forward runs on CUDA only; the model is on {first}")
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, num_tokens), device=first)
    base = {}
    for device in devices:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base[device] = torch.cuda.memory_allocated(device)
    # logits of the last position only, as an engine step computes logits only for sampled rows
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    peaks = {}
    for device in devices:
        torch.cuda.synchronize(device)
        peaks[device] = max(0, torch.cuda.max_memory_allocated(device) - base[device])
    del ids
    torch.cuda.empty_cache()
    return peaks


def profile_forward_peak(model, num_tokens: int) -> int:
    """Peak bytes one plain forward of ``num_tokens`` tokens allocates beyond what is resident (CUDA only)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"the profiling forward runs on CUDA only; the model is on {device}")
    return profile_forward_peaks(model, num_tokens, [device])[device]


def cuda_kv_budgets(model, fraction: float, num_tokens: int, devices: list[torch.device]) -> dict[torch.device, int]:
    """The KV budget of each CUDA device a model runs on: its memory reading after one profiling forward."""
    peaks = profile_forward_peaks(model, num_tokens, devices)
    budgets = {}
    for device, peak in peaks.items():
        free, total = torch.cuda.mem_get_info(device)
        budgets[device] = kv_budget_bytes(total, free, peak, fraction)
        logger.info("KV budget on %s %.2f GiB: %.0f%% of %.2f GiB minus %.2f GiB in use and a %.2f GiB forward "
                    "peak (%d tokens)", device, budgets[device] / _GIB, 100 * fraction, total / _GIB,
                    (total - free) / _GIB, peak / _GIB, num_tokens)
    return budgets


def cuda_kv_budget(model, fraction: float, num_tokens: int) -> int:
    """The KV budget of a CUDA model on one device: its memory reading after a profiling forward."""
    device = next(model.parameters()).device
    return cuda_kv_budgets(model, fraction, num_tokens, [device])[device]


def layer_devices(model) -> list[torch.device | None] | None:
    """Each cache layer's device for a model split over several devices (``device_map``), else None.

    A layer's device is where its attention module runs: the execution device of an accelerate hook on it or
    an ancestor, else its parameters' device. None for a layer whose device cannot be read (offloaded weights
    on ``meta``): its pools are then made at the first forward, on its keys' device.
    """
    hf_map = getattr(model, "hf_device_map", None)
    if not hf_map or len({str(d) for d in hf_map.values()}) < 2:
        return None
    num_layers = model.config.get_text_config().num_hidden_layers
    found: list[torch.device | None] = [None] * num_layers
    for name, module in model.named_modules():
        idx = getattr(module, "layer_idx", None)
        if not isinstance(idx, int) or not 0 <= idx < num_layers or found[idx] is not None:
            continue
        device = None
        parts = name.split(".")
        for depth in range(len(parts), -1, -1):  # the module itself, then its ancestors
            hook = getattr(model.get_submodule(".".join(parts[:depth])), "_hf_hook", None)
            device = getattr(hook, "execution_device", None)
            if device is not None:
                break
        if device is None:
            param = next(module.parameters(), None)
            device = None if param is None or param.device.type == "meta" else param.device
        found[idx] = None if device is None else torch.device(device)
    return found


def split_kv_blocks(budgets: dict[torch.device, int], devices: list[torch.device | None], per_block: int) -> int:
    """Blocks every device affords when each holds only its own layers' share of a block (``per_block`` bytes
    for all layers); a layer of unknown device is counted on every device."""
    unknown = sum(d is None for d in devices)
    return max(1, min(budget // max(1, math.ceil(per_block * (devices.count(d) + unknown) / len(devices)))
                      for d, budget in budgets.items()))


def num_kv_blocks(model, config: TurboConfig, extra_bytes_per_block: int = 0) -> int:
    """Blocks the KV budget affords: explicit, CUDA memory left after a profiling forward, or a CPU byte budget.

    ``extra_bytes_per_block``: memory that goes with each block elsewhere (a draft model's own
    pool of the same block count), so both fit the one budget.
    """
    cc = config.cache
    if cc.num_blocks is not None:
        return cc.num_blocks
    dtype = next(model.parameters()).dtype
    per_block = kv_bytes_per_block(model, cc.block_size, dtype, cc.kv_dtype) + extra_bytes_per_block  # this rank's
    device = next(model.parameters()).device
    split = layer_devices(model)
    cuda = sorted({d for d in split or () if d is not None and d.type == "cuda"}, key=str)
    # a forward longer than the model's positions would fail (absolute position embeddings)
    tokens = min(config.max_num_batched_tokens, config.max_model_len or model_max_len(model) or 1 << 30)
    if split is not None and len(cuda) > 1:  # layers over several GPUs: each holds its layers' share of a block
        blocks = split_kv_blocks(cuda_kv_budgets(model, cc.gpu_memory_fraction, tokens, cuda), split, per_block)
    elif device.type == "cuda":
        blocks = max(1, cuda_kv_budget(model, cc.gpu_memory_fraction, tokens) // per_block)
    else:
        blocks = max(1, cc.cpu_kv_bytes // per_block)
    max_len = config.max_model_len or model_max_len(model)
    if max_len:
        blocks = min(blocks, block_cap(config, max_len))
    return blocks


def block_cap(config: TurboConfig, max_len: int) -> int:
    """The most blocks worth having: twice what every running sequence at full length needs (a small model on a
    big card would otherwise get millions of blocks, and a block pool that takes seconds to build; past it,
    blocks only keep more prefix-cache entries alive)."""
    return 2 * config.max_num_seqs * math.ceil(max_len / config.cache.block_size)


def model_max_len(model) -> int | None:
    """The model's ``max_position_embeddings`` (text config), or None."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "max_position_embeddings", None)


@dataclass
class SlidingPlan:
    """How a cache's sliding layers release blocks (``cache/sliding.py``): the largest window, the cache layers
    that attend within one, the engine's block count and the sliding layers' physical block count."""

    window: int
    layers: list[int]
    num_blocks: int
    num_physical: int


def plan_sliding_release(model, config: TurboConfig, num_blocks: int, backend: str, device: torch.device,
                         grow: bool) -> tuple[str, SlidingPlan | None]:
    """``CacheConfig.sliding_release`` resolved for ``model``: the backend to use (the reference backend where
    the CPU backend would keep every position) and the plan, or None to keep every block. ``grow``: the
    memory the sliding layers save may buy more engine blocks (not with an explicit block count, a draft
    model's pool of the same count, or layers over several devices)."""
    from hf_turbo.backends import resolve_backend
    from hf_turbo.engine.attach import state_of
    from hf_turbo.engine.distributed import model_tp_size
    from hf_turbo.engine.probe import attended_windows

    cc = config.cache
    if cc.sliding_release is False:
        return backend, None
    if model_tp_size(model) > 1:  # decided before any forward: a forward under TP is a collective on every rank
        if cc.sliding_release:
            raise ValueError("CacheConfig.sliding_release=True is not supported for a tensor-parallel model")
        return backend, None
    state = state_of(model)  # the attach probe's record, else one short forward to read it
    windows = state.extras["windows"] if state is not None and "windows" in state.extras else attended_windows(model)
    if not windows:
        if cc.sliding_release:
            logger.info("CacheConfig.sliding_release: no layer attends within a sliding window; nothing to release")
        return backend, None
    window, layers = max(windows.values()), sorted(windows)
    bs, budget_tokens = cc.block_size, config.max_num_batched_tokens
    bound = physical_blocks_for(config.max_num_seqs, budget_tokens, window, bs)
    num_physical = min(num_blocks, bound)
    if max_running_for(num_physical, budget_tokens, window, bs) < 1:
        logger.info("sliding-window release off: %d blocks cannot hold one sequence's %d-token window", num_blocks,
                    window)
        return backend, None
    if resolve_backend(backend, device, cc.kv_dtype) == "cpu":
        if cc.sliding_release is None:
            logger.debug("sliding-window release off: the CPU backend's contiguous rows keep every position")
            return backend, None
        logger.info("CacheConfig.sliding_release: the reference backend instead of the CPU backend (whose "
                    "contiguous rows would keep every position)")
        backend = "reference"
    num_layers = kv_layout(model.config)[0]
    full, sliding = num_layers - len(layers), len(layers)
    blocks = num_blocks
    max_len = config.max_model_len or model_max_len(model)
    if grow and max_len:
        # the budget (num_layers x num_blocks layer-blocks) split so that the full layers' blocks and the sliding
        # layers' run out together when every running sequence is as long as the model allows
        per_seq_full, per_seq_window = math.ceil(max_len / bs), physical_blocks_for(1, 0, window, bs)
        budget = num_layers * num_blocks - sliding * math.ceil(budget_tokens / bs)
        seqs = max(1, budget // (full * per_seq_full + sliding * per_seq_window))
        num_physical = min(num_physical, max(physical_blocks_for(seqs, budget_tokens, window, bs),
                                             physical_blocks_for(1, budget_tokens, window, bs)))
        cap = block_cap(config, max_len)
        blocks = (num_layers * num_blocks - sliding * num_physical) // full if full else cap
        blocks = max(num_blocks, min(cap, blocks))
    logger.info("sliding-window release: layers %s attend within %d tokens; %d blocks for them, %d for the engine "
                "(%d before)", layers, window, num_physical, blocks, num_blocks)
    return backend, SlidingPlan(window, layers, blocks, num_physical)
