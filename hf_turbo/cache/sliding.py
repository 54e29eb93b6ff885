"""Sliding-window release: the sliding layers of a cache keep only the blocks their window still reads.

A query at position ``p`` of a layer with sliding window ``W`` attends keys ``p - W + 1 .. p`` (the window the
attention call carries, as the kernels apply it). So once a sequence's next query is at ``start``, its K/V
before ``start - W + 1`` are never read again by its sliding layers, while its full-attention layers still
read every position. The engine's block ids (the scheduler's :class:`~hf_turbo.cache.block_pool.BlockPool`)
stay what they are, and size the full layers' pools; the sliding layers' pools are smaller and addressed
by *physical* ids that :class:`SlidingBlocks` maps the engine's blocks to, only while some running sequence's
window covers them:

- before each forward, :meth:`SlidingBlocks.plan` moves every scheduled sequence's *holds* to the blocks
  covering ``[start - W + 1, end)`` of its chunk: blocks that left the window are let go, blocks the chunk
  writes get a physical block;
- a physical block nobody holds is freed, or kept as evictable (least recently released evicted first)
  when its engine block is in the prefix cache, so a later request with the same prefix can find it;
- the runner translates the step's block tables and slots through :attr:`SlidingBlocks.table` for the sliding
  layers (``ForwardContext.for_layer``); entries that left the window point at a zeroed scratch block the
  window mask then hides;
- a prefix-cache hit is cut to the longest prefix whose window before its end still has its sliding K/V
  (:meth:`usable_prefix`), and the scheduler admits at most :attr:`max_running` sequences, so the holds
  never outgrow the physical blocks.

Layers with different sliding windows share one map sized by the largest window (each still attends
within its own). An engine block's K/V are keyed by its :attr:`BlockPool.generation`: a block handed out
again is new data, even under the same id.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import numpy as np

__all__ = ["SlidingBlocks", "max_running_for", "physical_blocks_for"]


def physical_blocks_for(max_num_seqs: int, max_num_batched_tokens: int, window: int, block_size: int) -> int:
    """Physical blocks that ``max_num_seqs`` running sequences can hold at most: each chunk of ``c`` tokens
    holds the blocks covering ``window - 1 + c`` positions (at most ``(window - 1 + c) / block_size + 2``), the
    chunks of one step hold ``max_num_batched_tokens`` tokens in all, and each admitted prefix may pin one
    copied block until its first forward."""
    return -(-(max_num_seqs * (window - 1) + max_num_batched_tokens) // block_size) + 3 * max_num_seqs


def max_running_for(num_physical: int, max_num_batched_tokens: int, window: int, block_size: int) -> int:
    """The most running sequences whose holds ``num_physical`` blocks always cover (inverse of
    :func:`physical_blocks_for`, rounded down)."""
    per_seq = -(-(window - 1) // block_size) + 3
    return max(0, (num_physical - -(-max_num_batched_tokens // block_size)) // per_seq)


class SlidingBlocks:
    """The engine-block -> physical-block map of a cache's sliding layers (see the module docstring).

    ``num_blocks``: the engine's blocks (ids ``0 .. num_blocks - 1``, plus the scratch block ``num_blocks``);
    ``num_physical``: the sliding layers' blocks (plus a scratch block ``num_physical``, kept zero).
    """

    def __init__(self, pool, num_blocks: int, num_physical: int, window: int, layers: list[int],
                 max_num_batched_tokens: int) -> None:
        if window < 1:
            raise ValueError(f"a sliding window must be >= 1 token, got {window}")
        self.pool = pool
        self.block_size = pool.block_size
        self.window = window
        self.layers = frozenset(layers)
        self.num_blocks = num_blocks
        self.num_physical = num_physical
        self.scratch = num_physical
        self.max_running = max_running_for(num_physical, max_num_batched_tokens, window, self.block_size)
        if self.max_running < 1:
            raise ValueError(f"{num_physical} physical blocks cannot hold one sequence's window of {window} tokens")
        # engine block -> physical block (scratch where none), read by the runner for the sliding layers' tables
        self.table = np.full(num_blocks + 1, self.scratch, dtype=np.int64)
        self._phys: dict[tuple[int, int], int] = {}  # (engine block, generation) -> physical block
        self._key: list[tuple[int, int] | None] = [None] * num_physical
        self._holds = [0] * num_physical
        self._free: deque[int] = deque(range(num_physical))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # released, in the prefix cache: LRU first
        self._held: dict[int, tuple[object, int, deque]] = {}  # id(request) -> (request, first index, keys)
        self._pinned: list[tuple[int, int]] = []  # copied blocks, held until the next plan has taken them
        self.copy_layer = None  # copy_layer(physical src, physical dst): the cache copies its sliding pools

    # -- the sliding layers' addresses ---------------------------------------------------------------
    def map_slots(self, slots: np.ndarray) -> np.ndarray:
        """Engine slots (``block * block_size + offset``) as the sliding layers' pools address them."""
        bs = self.block_size
        return self.table[slots // bs] * bs + slots % bs

    def map_table(self, table: np.ndarray) -> np.ndarray:
        """Engine block tables as the sliding layers' pools address them (released entries: the scratch block)."""
        return self.table[table]

    # -- what a sequence holds ----------------------------------------------------------------------
    def held(self, req) -> int:
        """How many physical blocks ``req`` holds."""
        entry = self._held.get(id(req))
        return 0 if entry is None else len(entry[2])

    @property
    def num_held(self) -> int:
        """Physical blocks some sequence (or a pending copy) holds."""
        return sum(1 for h in self._holds if h)

    def _lo(self, start: int) -> int:
        return max(0, start - self.window + 1) // self.block_size

    def _current(self, block: int) -> tuple[int, int]:
        return block, self.pool.generation[block]

    def plan(self, scheduled) -> None:
        """Move each scheduled ``(request, n new tokens)``'s holds to the blocks its chunk reads and writes."""
        missing = []
        for req, n in scheduled:
            start, end = req.num_computed, req.num_computed + n
            blocks = req.block_ids
            hi = min(len(blocks), -(-end // self.block_size))
            _, lo, keys = self._held.get(id(req)) or (req, self._lo(start), deque())
            # blocks dropped from the tail (rejected speculation) or swapped: let go of what no longer matches
            while keys and (lo + len(keys) > len(blocks) or keys[-1] != self._current(blocks[lo + len(keys) - 1])):
                self._drop(keys.pop())
            new_lo = self._lo(start)
            while keys and lo < new_lo:
                self._drop(keys.popleft())
                lo += 1
            if not keys:
                lo = new_lo
            for i in range(lo + len(keys), hi):
                key = self._current(blocks[i])
                if key in self._phys:
                    self._hold(key)
                else:
                    if i * self.block_size < start and (i + 1) * self.block_size > start - self.window + 1:
                        raise RuntimeError(f"request {req.request_id}: the sliding layers' K/V of block {i} "
                                           "were released while its window still reads them")
                    missing.append(key)
                keys.append(key)
            self._held[id(req)] = (req, lo, keys)
        for key in missing:  # after every existing block has been held: none of them is evicted here
            if key not in self._phys:
                self._map(key, self._allocate())
            self._holds[self._phys[key]] += 1
        for key in self._pinned:
            self._drop(key)
        self._pinned.clear()

    def release(self, req) -> None:
        """Let go of everything ``req`` holds (it finished or was preempted)."""
        entry = self._held.pop(id(req), None)
        if entry is not None:
            for key in entry[2]:
                self._drop(key)

    # -- prefix cache -------------------------------------------------------------------------------
    def usable_prefix(self, blocks: list[int]) -> int:
        """How many leading ``blocks`` (a prefix-cache hit) a new sequence can take: the longest prefix whose
        last ``window - 1`` positions still have their sliding K/V."""
        bs = self.block_size
        j = len(blocks)
        while j > 0:
            lo = max(0, j * bs - self.window + 1) // bs
            bad = [i for i in range(lo, j) if self._current(blocks[i]) not in self._phys]
            if not bad:
                return j
            j = bad[-1]  # a prefix ending at or before the missing block
        return 0

    def adopt(self, req, blocks: list[int], num_tokens: int) -> None:
        """``req`` takes ``blocks``, the blocks of its first ``num_tokens`` positions (a prefix hit cut by
        :meth:`usable_prefix`): it holds the ones its next query's window reads."""
        self.release(req)
        lo, hi = self._lo(num_tokens), -(-num_tokens // self.block_size)
        keys = deque()
        for i in range(lo, hi):
            key = self._current(blocks[i])
            if key not in self._phys:
                raise RuntimeError(f"request {req.request_id}: block {i} of its prefix has no sliding K/V")
            self._hold(key)
            keys.append(key)
        self._held[id(req)] = (req, lo, keys)

    def copy(self, src: int, dst: int) -> None:
        """Copy-on-write of engine block ``src`` into ``dst`` (a shared prompt's last block) in the sliding
        layers; ``dst`` is pinned until the next plan."""
        from_key = self._current(src)
        if from_key not in self._phys:
            raise RuntimeError(f"block {src} has no sliding K/V to copy")
        key = self._current(dst)
        if key not in self._phys:
            self._map(key, self._allocate())
        self._hold(key)
        self._pinned.append(key)
        self.copy_layer(self._phys[from_key], self._phys[key])

    # -- physical blocks ----------------------------------------------------------------------------
    def _hold(self, key: tuple[int, int]) -> None:
        phys = self._phys[key]
        if self._holds[phys] == 0:
            self._evictable.pop(phys, None)
        self._holds[phys] += 1

    def _drop(self, key: tuple[int, int]) -> None:
        phys = self._phys[key]
        self._holds[phys] -= 1
        if self._holds[phys]:
            return
        block, gen = key
        if self.pool.generation[block] == gen and self.pool.is_cached(block):
            self._evictable[phys] = None  # a later prefix hit may read it
        else:
            self._unmap(phys)
            self._free.append(phys)

    def _allocate(self) -> int:
        if self._free:
            return self._free.popleft()
        if not self._evictable:
            raise RuntimeError("no physical block left for the sliding layers (the admission limit should "
                               "have prevented this)")
        phys, _ = self._evictable.popitem(last=False)
        self._unmap(phys)
        return phys

    def _map(self, key: tuple[int, int], phys: int) -> None:
        self._phys[key] = phys
        self._key[phys] = key
        self.table[key[0]] = phys

    def _unmap(self, phys: int) -> None:
        key = self._key[phys]
        self._key[phys] = None
        del self._phys[key]
        if self.table[key[0]] == phys:
            self.table[key[0]] = self.scratch

    def check_invariants(self) -> None:
        """Raise AssertionError if holds, maps and free lists disagree (tests, debug)."""
        counted = [0] * self.num_physical
        for _, _, keys in self._held.values():
            for key in keys:
                counted[self._phys[key]] += 1
        for key in self._pinned:
            counted[self._phys[key]] += 1
        if counted != self._holds:
            raise AssertionError("sliding holds do not match the sequences' held blocks")
        free, evictable = set(self._free), set(self._evictable)
        for phys in range(self.num_physical):
            mapped = self._key[phys] is not None
            if (phys in free) == mapped or (phys in evictable and (self._holds[phys] or not mapped)):
                raise AssertionError(f"physical block {phys}: mapped={mapped}, free={phys in free}, "
                                     f"evictable={phys in evictable}, holds={self._holds[phys]}")
            if mapped and not self._holds[phys] and phys not in evictable:
                raise AssertionError(f"physical block {phys} is mapped, unheld and not evictable")
