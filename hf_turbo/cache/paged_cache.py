"""PagedKVCache: a ``transformers.Cache`` whose K/V live in fixed-size blocks shared across requests.

Per layer, keys and values are pools of shape [num_blocks, block_size, H_kv, D]. Which slots a
forward writes, and which blocks each sequence reads, come from the :class:`ForwardContext` the
engine's runner sets before the forward. ``update()`` hands the new K/V to the engine's backend
(``hf_turbo.backends``), which writes them into the pools, and returns them unchanged; the "hf_turbo"
attention then asks the backend to read each sequence's whole context through its block table.

With an 8-bit ``kv_dtype`` the pools hold int8 or fp8 values and two more pools per layer hold their float32
scales, [num_blocks, block_size, H_kv] (``backends/kv_quant.py``); the backend quantizes where it writes
and dequantizes inside attention, and ``read_tokens`` / ``write_tokens`` convert at the cache's edge.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers.cache_utils import Cache

from hf_turbo.backends import Backend, get_backend
from hf_turbo.backends.kv_quant import (
    SCALE_DTYPE,
    dequantize_kv,
    kv_bytes_per_token_head,
    storage_dtype,
    write_quantized,
)
from hf_turbo.cache.sliding import SlidingBlocks

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
    host_cu_seqlens_q: list[int]  # host copies of cu_seqlens_q and context_lens
    host_context_lens: list[int]
    backend: Backend
    seqs: list | None = None  # the engine's sequences, in order (None: a forward outside them, e.g. a check)
    meta: object = None  # the backend's metadata for this forward, made by ``backend.prepare`` before it runs
    # (layer, key, value) of the latest PagedKVCache.update: attention reads the pools of the layer its K/V
    # were written to, and only if it attends over exactly those tensors (see patches/attention.py)
    last_write: tuple | None = None
    seen_windows: dict | None = None  # the accelerate() probe's record: cache layer -> sliding_window attended with
    per_device: dict | None = None  # a layer-split model's copies of this context on its other devices (``on``)
    # the sliding layers' view of this forward (tables and slots through cache.sliding.table), when they release
    sliding: ForwardContext | None = None

    def for_layer(self, layer: int) -> ForwardContext:
        """This forward's context for cache layer ``layer``: the sliding layers' own (their blocks mapped to the
        smaller pools of ``cache/sliding.py``) where the cache releases them, else ``self``."""
        if self.sliding is not None and layer in self.cache.sliding.layers:
            return self.sliding
        return self

    def on(self, device: torch.device) -> ForwardContext:
        """This forward's context for layers on ``device`` (a model split over devices by ``device_map``): the
        metadata copied there once per forward and prepared by a backend that runs there (the same backend on a
        device of the same type, else the reference backend); ``self`` on the context's own device."""
        if device == self.slot_mapping.device:
            return self
        if self.per_device is None:
            self.per_device = {}
        ctx = self.per_device.get(device)
        if ctx is None:
            backend = self.backend if device.type == self.slot_mapping.device.type else get_backend("reference",
                                                                                                    device)
            ctx = replace(self, slot_mapping=self.slot_mapping.to(device), cu_seqlens_q=self.cu_seqlens_q.to(device),
                          context_lens=self.context_lens.to(device), block_tables=self.block_tables.to(device),
                          backend=backend, meta=None, per_device=None, sliding=None)
            backend.prepare(ctx)
            self.per_device[device] = ctx
        return ctx


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
    head count and head dim, on the key's device), with ``num_blocks`` fixed up front; or up front from
    ``kv_shape``, each layer on its entry of ``layer_devices`` (a model split over devices) or ``device``.
    """

    is_compileable = False

    def __init__(self, num_blocks: int, block_size: int, num_layers: int, dtype: torch.dtype,
                 device: torch.device | str, kv_shape: tuple[int, int] | None = None,
                 backend: Backend | None = None, kv_dtype: str = "auto",
                 layer_devices: list[torch.device | None] | None = None, sliding: SlidingBlocks | None = None) -> None:
        super().__init__(layers=[])
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_layers = num_layers
        self.dtype = dtype  # the model's: what K/V are written and read as
        self.kv_dtype = kv_dtype
        self.storage_dtype = storage_dtype(kv_dtype, dtype)  # what the pools hold
        self.quantized = kv_dtype != "auto"
        self.device = torch.device(device)
        self.key_pools: list[torch.Tensor | None] = [None] * num_layers
        self.value_pools: list[torch.Tensor | None] = [None] * num_layers
        # 8-bit caches only: per (block, slot, KV head) scales of the values in the pools
        self.key_scales: list[torch.Tensor | None] = [None] * num_layers
        self.value_scales: list[torch.Tensor | None] = [None] * num_layers
        self.ctx: ForwardContext | None = None
        self.sliding = sliding  # the sliding layers' block map, when they release blocks that left their window
        if sliding is not None:
            sliding.copy_layer = self._copy_sliding
        self.backend = backend if backend is not None else get_backend("auto", self.device, kv_dtype)
        self.backend_state = self.backend.new_cache_state(self)  # what the backend keeps beside the pools
        if kv_shape is not None:  # allocate now, not inside the first (timed) forward
            for i in range(num_layers):
                self._allocate_layer(i, kv_shape, (layer_devices or [None] * num_layers)[i])

    @staticmethod
    def bytes_per_block(config, block_size: int, dtype: torch.dtype, kv_dtype: str = "auto") -> int:
        """Bytes of one block over every layer's K and V (with an 8-bit ``kv_dtype``: values and scales)."""
        layers, kv_heads, head_dim = kv_layout(config)
        return 2 * layers * block_size * kv_heads * kv_bytes_per_token_head(kv_dtype, head_dim, dtype)

    def __len__(self) -> int:
        return self.num_layers

    def __repr__(self) -> str:
        return (f"PagedKVCache(num_blocks={self.num_blocks}, block_size={self.block_size}, "
                f"layers={self.num_layers}, dtype={self.dtype}, kv_dtype={self.kv_dtype}, device={self.device})")

    def _allocate_layer(self, layer_idx: int, kv_shape: tuple[int, int], device: torch.device | None = None) -> None:
        # empty, not zeros: no slot is read before it is written (kernels and references read only
        # each sequence's own positions), and untouched pages cost nothing on the CPU
        sliding = self.sliding is not None and layer_idx in self.sliding.layers
        shape = (self.sliding.num_physical + 1 if sliding else self.num_blocks, self.block_size, *kv_shape)
        device = self.device if device is None else device
        self.key_pools[layer_idx] = torch.empty(shape, dtype=self.storage_dtype, device=device)
        self.value_pools[layer_idx] = torch.empty(shape, dtype=self.storage_dtype, device=device)
        if self.quantized:
            self.key_scales[layer_idx] = torch.empty(shape[:3], dtype=SCALE_DTYPE, device=device)
            self.value_scales[layer_idx] = torch.empty(shape[:3], dtype=SCALE_DTYPE, device=device)
        if sliding:  # the scratch block that released table entries point at: finite, never written
            for pool in self.layer_pools(layer_idx) + self.layer_scales(layer_idx):
                if pool is not None:
                    pool[self.sliding.scratch].zero_()

    def layer_pools(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key_pools[layer_idx], self.value_pools[layer_idx]

    def layer_scales(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """The scales of ``layer_idx``'s pools ([num_blocks, block_size, H_kv] float32), (None, None) unquantized."""
        return self.key_scales[layer_idx], self.value_scales[layer_idx]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the forward's new K/V ([1, H_kv, T, D]) into the pools at the context's slots."""
        if self.ctx is None:
            raise RuntimeError("PagedKVCache.update called outside an hf_turbo forward (no ForwardContext)")
        if value_states.shape[1] != key_states.shape[1] or value_states.shape[-1] != key_states.shape[-1]:
            # MLA families (deepseek_v2/v3, minicpm3) cache a latent and a rotary part under these names
            raise ValueError(f"layer {layer_idx} caches keys {tuple(key_states.shape[1::2])} and values "
                             f"{tuple(value_states.shape[1::2])} of different (heads, dim): not the K/V the paged "
                             "pools hold (a compressed, MLA-style cache)")
        pool = self.key_pools[layer_idx]
        if (pool is None or pool.shape[2] != key_states.shape[1] or pool.shape[3] != key_states.shape[-1]
                or pool.device != key_states.device):
            # key_states: [B, H_kv, T, D]; a layer whose K/V differ from the config's layout, or that runs on
            # another device than the one its pools were made on (a split the engine could not read up front)
            self._allocate_layer(layer_idx, (key_states.shape[1], key_states.shape[-1]), key_states.device)
        # [1, H_kv, T, D] -> [T, H_kv, D]
        k = key_states[0].transpose(0, 1)
        v = value_states[0].transpose(0, 1)
        if k.stride(-1) != 1 or v.stride(-1) != 1:  # e.g. K/V sliced out of a fused projection's last dim
            k, v = k.contiguous(), v.contiguous()
        ctx = self.ctx.for_layer(layer_idx).on(k.device)
        ctx.backend.write_kv(ctx, layer_idx, k, v)  # the runner's slots: int64, all valid
        self.ctx.last_write = (layer_idx, key_states, value_states)
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

    def forget_sequences(self) -> None:
        """Drop what the backend keeps beside the pools for every sequence (the pools are kept)."""
        self.backend_state = self.backend.new_cache_state(self)

    def reset(self) -> None:
        self.forget_sequences()
        for pool in self.key_pools + self.value_pools + self.key_scales + self.value_scales:
            if pool is not None:
                pool.zero_()

    def read_tokens(self, layer_idx: int, block_ids: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V of a sequence's first ``n`` positions in one layer: two ``[n, H_kv, D]`` copies (in the
        model's dtype: an 8-bit cache's values dequantized, as attention reads them)."""
        block_ids = self._layer_blocks(layer_idx, block_ids[:-(-n // self.block_size)])
        blocks = torch.as_tensor(block_ids, dtype=torch.long, device=self.key_pools[layer_idx].device)
        out = []
        for pool, scales in zip(self.layer_pools(layer_idx), self.layer_scales(layer_idx)):
            values = pool.index_select(0, blocks).flatten(0, 1)[:n]  # [blocks*bs, H, D] -> [n, H, D]
            if scales is not None:
                values = dequantize_kv(values, scales.index_select(0, blocks).flatten(0, 1)[:n], self.dtype)
            out.append(values.clone())
        return out[0], out[1]

    def write_tokens(self, layer_idx: int, block_ids: list[int], key: torch.Tensor, value: torch.Tensor) -> None:
        """Write ``[n, H_kv, D]`` K/V into a sequence's first ``n`` positions of one layer (an imported cache;
        quantized as the backend quantizes a forward's K/V in an 8-bit cache)."""
        if self.key_pools[layer_idx] is None or self.key_pools[layer_idx].shape[2:] != key.shape[1:]:
            self._allocate_layer(layer_idx, (key.shape[1], key.shape[2]))
        block_ids = self._layer_blocks(layer_idx, block_ids)
        n, device = key.shape[0], self.key_pools[layer_idx].device
        pos = torch.arange(n, device=device)
        blocks = torch.as_tensor(block_ids, dtype=torch.long, device=device)
        slots = blocks[pos // self.block_size] * self.block_size + pos % self.block_size
        for pool, scales, src in zip(self.layer_pools(layer_idx), self.layer_scales(layer_idx), (key, value)):
            src = src.to(device=device, dtype=self.dtype)
            if scales is not None:
                write_quantized(pool, scales, slots, src, self.kv_dtype)
            else:
                pool.view(-1, *pool.shape[2:]).index_copy_(0, slots, src)
        self.backend.invalidate(self)

    def _layer_blocks(self, layer_idx: int, block_ids: list[int]) -> list[int]:
        """``block_ids`` as ``layer_idx``'s pools address them (a releasing sliding layer's own blocks)."""
        if self.sliding is None or layer_idx not in self.sliding.layers:
            return block_ids
        mapped = [int(self.sliding.table[b]) for b in block_ids]
        if self.sliding.scratch in mapped:
            raise RuntimeError(f"layer {layer_idx} released the K/V of positions outside its sliding window "
                               "(CacheConfig(sliding_release=False) keeps them)")
        return mapped

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's K/V in every layer (copy-on-write)."""
        for i in range(self.num_layers):
            if self.sliding is None or i not in self.sliding.layers:
                self._copy_layer_block(i, src, dst)
        if self.sliding is not None:
            self.sliding.copy(src, dst)  # calls _copy_sliding with the sliding layers' own blocks

    def _copy_sliding(self, src: int, dst: int) -> None:
        for i in self.sliding.layers:
            self._copy_layer_block(i, src, dst)

    def _copy_layer_block(self, layer_idx: int, src: int, dst: int) -> None:
        for pool in self.layer_pools(layer_idx) + self.layer_scales(layer_idx):
            if pool is not None:
                pool[dst].copy_(pool[src])
