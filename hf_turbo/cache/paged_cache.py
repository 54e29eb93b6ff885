"""PagedKVCache: a ``transformers.Cache`` whose K/V live in fixed-size blocks shared across requests.

Per layer, keys and values are pools of shape [num_blocks, block_size, H_kv, D]. Which slots a
forward writes, and which blocks each sequence reads, come from the :class:`ForwardContext` the
engine's runner sets before the forward. ``update()`` scatters the new K/V into the pools (Triton
on CUDA; on the CPU one ``cpu_ext.scatter_kv`` call, or index_copy) and returns the new K/V
unchanged; the "hf_turbo" attention then reads each sequence's whole context from the pools through
its block table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from hf_turbo.cache.contiguous import ContiguousKV
from hf_turbo.kernels import store_kv

__all__ = ["ForwardContext", "PagedKVCache", "kv_layout"]


@dataclass
class ForwardContext:
    """What one packed varlen forward needs to know beyond the token ids (passed, never global).

    Shapes: T = new tokens in this forward, S = sequences.
    """

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [T] int64, -1 = skip
    cu_seqlens_q: torch.Tensor  # [S + 1] int32
    context_lens: torch.Tensor  # [S] int32, cached + new tokens per sequence
    block_tables: torch.Tensor  # [S, max_blocks] int32
    max_seqlen_q: int
    max_context_len: int
    backend: str = "auto"
    plan_cache: dict = field(default_factory=dict)  # per-forward metadata shared by all layers
    # host copies of cu_seqlens_q / context_lens and the sequence objects (CPU contiguous-K/V path)
    host_cu_seqlens_q: list[int] | None = None
    host_context_lens: list[int] | None = None
    seqs: list | None = None
    mirror_plan: object | None = None  # ContiguousKV.plan of this forward, made by its first attention call
    decode_batch: tuple | None = None  # (all single-query?, their rows, slots, lengths): for cpu_ext, made once


def kv_layout(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a transformers config (text config for multimodal)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if getattr(cfg, "multi_query", False):
        kv_heads = 1
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return layers, kv_heads, head_dim


class PagedKVCache(Cache):
    """K/V pools for every layer, addressed by block id; shared by all requests of an engine.

    Pools are allocated lazily on the first ``update()`` of each layer (from the key's own
    head count and head dim), with ``num_blocks`` fixed up front.
    """

    is_compileable = False

    def __init__(self, num_blocks: int, block_size: int, num_layers: int, dtype: torch.dtype,
                 device: torch.device | str, kv_shape: tuple[int, int] | None = None) -> None:
        super().__init__(layers=[])
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_layers = num_layers
        self.dtype = dtype
        self.device = torch.device(device)
        self.key_pools: list[torch.Tensor | None] = [None] * num_layers
        self.value_pools: list[torch.Tensor | None] = [None] * num_layers
        self.ctx: ForwardContext | None = None
        self.contiguous = ContiguousKV(num_layers, block_size, num_blocks)  # used by the CPU attention path only
        if kv_shape is not None:  # allocate now, not inside the first (timed) forward
            for i in range(num_layers):
                self._allocate_layer(i, kv_shape)

    @staticmethod
    def bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
        layers, kv_heads, head_dim = kv_layout(config)
        return 2 * layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def __len__(self) -> int:
        return self.num_layers

    def __repr__(self) -> str:
        return (f"PagedKVCache(num_blocks={self.num_blocks}, block_size={self.block_size}, "
                f"layers={self.num_layers}, dtype={self.dtype}, device={self.device})")

    def _allocate_layer(self, layer_idx: int, kv_shape: tuple[int, int]) -> None:
        # empty, not zeros: no slot is read before it is written (kernels and references read only
        # each sequence's own positions), and untouched pages cost nothing on the CPU
        shape = (self.num_blocks, self.block_size, *kv_shape)
        self.key_pools[layer_idx] = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.value_pools[layer_idx] = torch.empty(shape, dtype=self.dtype, device=self.device)

    def layer_pools(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key_pools[layer_idx], self.value_pools[layer_idx]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the forward's new K/V ([1, H_kv, T, D]) into the pools at the context's slots."""
        if self.ctx is None:
            raise RuntimeError("PagedKVCache.update called outside an hf_turbo forward (no ForwardContext)")
        pool = self.key_pools[layer_idx]
        if pool is None or pool.shape[2] != key_states.shape[1] or pool.shape[3] != key_states.shape[-1]:
            # key_states: [B, H_kv, T, D]; a layer whose K/V differ from the config's layout
            self._allocate_layer(layer_idx, (key_states.shape[1], key_states.shape[-1]))
        # [1, H_kv, T, D] -> [T, H_kv, D]
        k = key_states[0].transpose(0, 1)
        v = value_states[0].transpose(0, 1)
        store_kv(k, v, self.key_pools[layer_idx], self.value_pools[layer_idx], self.ctx.slot_mapping,
                 validate=False)  # the runner's slots: int64, all valid
        if self.ctx.seqs is None:  # the CPU mirror does not see this write
            self.contiguous.invalidate()
        return key_states, value_states

    # -- what transformers' model and mask code asks of a cache --------------------------------
    def get_seq_length(self, layer_idx: int = 0, *args, **kwargs) -> int:
        # Positions come from explicit position_ids in a packed forward; 0 keeps HF from offsetting.
        return 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0, *args, **kwargs) -> tuple[int, int]:
        # 5.24 passes the query length, 5.17 the cache_position tensor.
        n = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return n, 0

    def get_query_offset(self, layer_idx: int = 0, *args, **kwargs) -> int:
        return 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def max_batch_size(self) -> int:
        return 1

    def has_previous_state(self, *args, **kwargs) -> bool:
        return False

    def reset(self) -> None:
        self.contiguous.clear()
        for pool in self.key_pools + self.value_pools:
            if pool is not None:
                pool.zero_()

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's K/V in every layer (copy-on-write)."""
        for pools in (self.key_pools, self.value_pools):
            for pool in pools:
                if pool is not None:
                    pool[dst].copy_(pool[src])
