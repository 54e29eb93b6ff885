from __future__ import annotations

import random

import pytest

from hf_turbo.cache.block_pool import BlockPool, NoFreeBlocksError, hash_block_tokens


def make_pool(n: int = 8, bs: int = 4) -> BlockPool:
    pool = BlockPool(n, bs)
    pool.check_invariants()
    return pool


def free_list(pool: BlockPool) -> list[int]:
    return list(pool._free)


def test_allocate_takes_front_of_free_queue():
    pool = make_pool()
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.ref_counts[:4] == [1, 1, 1, 0]
    assert free_list(pool) == [3, 4, 5, 6, 7]
    assert pool.num_free == 5 and pool.num_used == 3
    pool.check_invariants()


def test_free_appends_in_given_order_and_refcounts():
    pool = make_pool()
    blocks = pool.allocate(3)
    pool.incref([1])
    pool.free(reversed(blocks))
    assert pool.ref_counts[:3] == [0, 1, 0]
    assert free_list(pool) == [3, 4, 5, 6, 7, 2, 0]
    pool.check_invariants()
    pool.free([1])
    assert free_list(pool)[-1] == 1
    pool.check_invariants()


def test_allocate_too_many_raises_and_changes_nothing():
    pool = make_pool(4)
    pool.allocate(3)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert pool.num_free == 1
    pool.check_invariants()


def test_double_free_raises():
    pool = make_pool()
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(ValueError, match="ref count 0"):
        pool.free([b])
    pool.check_invariants()


def test_fork_and_copy_on_write():
    pool = make_pool()
    a = pool.allocate(2)
    shared = pool.fork(a)
    assert shared == a and pool.ref_counts[a[0]] == 2
    new, copy = pool.copy_on_write(a[1])
    assert copy and new == 2 and pool.ref_counts[a[1]] == 1 and pool.ref_counts[new] == 1
    same, copy2 = pool.copy_on_write(new)
    assert same == new and not copy2
    pool.check_invariants()


def test_prefix_cache_reuse_and_lru_eviction():
    pool = make_pool(4, 2)
    h0 = hash_block_tokens(None, [1, 2])
    h1 = hash_block_tokens(h0, [3, 4])
    a = pool.allocate(2)
    pool.cache_block(a[0], h0)
    pool.cache_block(a[1], h1)
    pool.free(reversed(a))
    assert pool.num_free == 4 and pool.num_cached == 2
    # a new request with the same prefix revives both blocks
    got = pool.match_prefix([h0, h1, hash_block_tokens(h1, [5, 6])])
    assert got == a and pool.ref_counts[a[0]] == 1
    assert pool.prefix_hits == 2 and pool.prefix_queries == 3
    pool.free(reversed(got))
    pool.check_invariants()
    # uncached blocks 2, 3 are at the front: allocating two keeps the cache
    assert pool.allocate(2) == [2, 3]
    assert pool.num_cached == 2
    # the next allocation evicts the least recently freed cached block (the tail block a[1])
    assert pool.allocate(1) == [a[1]]
    assert pool.lookup(h1) is None and pool.lookup(h0) == a[0]
    pool.check_invariants()


def test_chained_hash_depends_on_parent():
    h_a = hash_block_tokens(None, [1, 2])
    h_b = hash_block_tokens(None, [9, 9])
    assert hash_block_tokens(h_a, [3, 4]) != hash_block_tokens(h_b, [3, 4])
    assert hash_block_tokens(h_a, [3, 4]) == hash_block_tokens(h_a, [3, 4])
    assert hash_block_tokens(None, [12, 3]) != hash_block_tokens(None, [1, 23])


def test_cached_block_is_copied_on_write():
    pool = make_pool()
    (b,) = pool.allocate(1)
    pool.cache_block(b, hash_block_tokens(None, [1, 2, 3, 4]))
    new, copy = pool.copy_on_write(b)
    assert copy and new != b
    pool.check_invariants()


def test_random_operations_keep_invariants():
    rng = random.Random(0)
    pool = make_pool(16, 2)
    owned: list[list[int]] = []
    for step in range(500):
        op = rng.random()
        if op < 0.4 and pool.num_free:
            blocks = pool.allocate(rng.randint(1, min(3, pool.num_free)))
            for b in blocks:
                if rng.random() < 0.5:
                    pool.cache_block(b, hash_block_tokens(None, [step, b]))
            owned.append(blocks)
        elif op < 0.6 and owned:
            owned.append(pool.fork(rng.choice(owned)))
        elif owned:
            pool.free(reversed(owned.pop(rng.randrange(len(owned)))))
        pool.check_invariants()
    for blocks in owned:
        pool.free(blocks)
    pool.check_invariants()
    assert pool.num_free == 16


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockPool(4, 0)
