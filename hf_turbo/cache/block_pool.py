"""Ref-counted fixed-size KV blocks with a free list and a prefix-hash index (pure Python, no torch).

A block holds ``block_size`` token slots of every layer's K/V. Blocks are shared by reference count
(prefix sharing, forks); a block whose count drops to zero goes to the END of the free queue but
keeps its prefix hash, so a later request with the same prefix can revive it. Allocation pops from
the FRONT (least recently freed first) and only then forgets the evicted block's hash: cached blocks
are evicted LRU, and only when memory is needed (the scheme of vLLM's v1 KV cache manager).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

__all__ = ["BlockPool", "NoFreeBlocksError", "hash_block_tokens"]


class NoFreeBlocksError(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int], extra: bytes = b"") -> bytes:
    """Hash of a full block chained to its parent block's hash (sha256: collisions are not a risk).

    ``extra`` separates caches that must not share blocks (e.g. another model or dtype).
    """
    h = hashlib.sha256()
    h.update(parent_hash or b"\x00" * 32)
    h.update(extra)
    h.update(b",".join(str(int(t)).encode() for t in token_ids))
    return h.digest()


class BlockPool:
    """Fixed pool of ``num_blocks`` blocks of ``block_size`` tokens.

    Invariants (checked by :meth:`check_invariants`): each block is either in use (ref count > 0,
    not in the free queue) or free (ref count 0, in the free queue); ``num_free + num_used ==
    num_blocks``; every hashed block is in the index under its hash and vice versa.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        # how many times each block has been handed out fresh by allocate(): a block's K/V belong to one
        # generation (what a sliding-window cache keys its released layers' copies by, cache/sliding.py)
        self.generation = [0] * num_blocks
        # Free queue in eviction order: front = evicted first. OrderedDict gives O(1) removal of a
        # revived block from the middle.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._block_hash: dict[int, bytes] = {}
        self._hash_to_block: dict[bytes, int] = {}
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -- counts ---------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks with ref count 0 (cached ones included: they are evictable)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks that carry a prefix hash (in use or free)."""
        return len(self._block_hash)

    @property
    def num_cached_free(self) -> int:
        return sum(1 for b in self._free if b in self._block_hash)

    # -- allocation -----------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the front of the free queue (evicting their cached hashes)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            self._forget_hash(block)
            self.ref_counts[block] = 1
            self.generation[block] += 1
            out.append(block)
        return out

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; blocks reaching zero join the end of the free queue.

        Pass a sequence's blocks in reverse order so its tail blocks (least likely to be shared)
        are evicted before its head blocks.
        """
        for block in blocks:
            rc = self.ref_counts[block]
            if rc <= 0:
                raise ValueError(f"block {block} freed with ref count {rc}")
            self.ref_counts[block] = rc - 1
            if rc == 1:
                self._free[block] = None

    def incref(self, blocks: Iterable[int]) -> None:
        """Add a reference to blocks (sharing); revives cached blocks sitting in the free queue."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1

    def fork(self, blocks: Sequence[int]) -> list[int]:
        """Share ``blocks`` with a new owner (copy-on-write later); returns the same ids."""
        self.incref(blocks)
        return list(blocks)

    def copy_on_write(self, block: int) -> tuple[int, bool]:
        """Make ``block`` exclusively writable by its caller.

        Returns ``(block_id, needs_copy)``: the same block if the caller is its only owner and it
        carries no prefix hash; else a fresh block (the caller copies the K/V into it) and the
        caller's reference to the old one is dropped.
        """
        if self.ref_counts[block] == 1 and block not in self._block_hash:
            return block, False
        (new,) = self.allocate(1)
        self.free([block])
        return new, True

    # -- prefix cache ---------------------------------------------------------------------------
    def is_cached(self, block: int) -> bool:
        """Whether ``block`` carries a prefix hash (a later request may revive it)."""
        return block in self._block_hash

    def lookup(self, block_hash: bytes) -> int | None:
        """The block caching this hash, or None (does not take a reference)."""
        return self._hash_to_block.get(block_hash)

    def peek_prefix(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of a hash chain are cached (takes no reference, counts no query)."""
        n = 0
        while n < len(hashes) and hashes[n] in self._hash_to_block:
            n += 1
        return n

    def match_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """Longest run of cached blocks for a chain of block hashes; takes a reference to each."""
        found = []
        for h in hashes:
            block = self._hash_to_block.get(h)
            if block is None:
                break
            found.append(block)
        self.prefix_queries += len(hashes)
        self.prefix_hits += len(found)
        self.incref(found)
        return found

    def cache_block(self, block: int, block_hash: bytes) -> None:
        """Register a full, written block under its chained hash (first writer wins)."""
        if block in self._block_hash or block_hash in self._hash_to_block:
            return
        self._block_hash[block] = block_hash
        self._hash_to_block[block_hash] = block

    def reset_prefix_cache(self) -> None:
        """Forget every hash (blocks stay allocated as they are)."""
        self._block_hash.clear()
        self._hash_to_block.clear()

    def _forget_hash(self, block: int) -> None:
        h = self._block_hash.pop(block, None)
        if h is not None and self._hash_to_block.get(h) == block:
            del self._hash_to_block[h]

    # -- checks ---------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if the pool's bookkeeping is inconsistent (for tests/debug mode)."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("duplicate block in free queue")
        for b, rc in enumerate(self.ref_counts):
            if rc < 0:
                raise AssertionError(f"block {b} has negative ref count {rc}")
            if (rc == 0) != (b in free):
                raise AssertionError(f"block {b}: ref count {rc} but in_free_queue={b in free}")
        used = sum(1 for rc in self.ref_counts if rc > 0)
        if used + len(free) != self.num_blocks:
            raise AssertionError(f"free {len(free)} + used {used} != total {self.num_blocks}")
        for b, h in self._block_hash.items():
            if self._hash_to_block.get(h) != b:
                raise AssertionError(f"block {b} hash index mismatch")
        if len(self._hash_to_block) != len(self._block_hash):
            raise AssertionError("hash index sizes differ")
