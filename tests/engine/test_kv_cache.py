"""KV block pool and prefix cache, without tensors or a model."""

from __future__ import annotations

import pytest

from array import array

from layerserve.engine.kv_cache import KVCacheManager, extend_block_hashes

BS = 4


def fill(kv: KVCacheManager, tokens: list[int]) -> list[int]:
    """Allocate blocks for `tokens` as a sequence would, compute them, index the full blocks."""
    hashes: list[bytes] = []
    hit = kv.match_prefix(tokens, hashes)
    table = hit + kv.allocate(kv.blocks_needed(len(tokens)) - len(hit))
    kv.cache_full_blocks(table, tokens, len(tokens), hashes)
    return table


def test_match_insert_reuse():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    tokens = list(range(10))  # 2 full blocks + 2 tokens
    table = fill(kv, tokens)
    assert len(table) == 3 and kv.num_cached_blocks == 2
    kv.free(table)
    assert kv.num_free_blocks == 8  # cached blocks count as free
    hashes: list[bytes] = []
    hit = kv.match_prefix(tokens + [99], hashes)
    assert hit == table[:2]
    assert kv.stats.queries == kv.stats.hits == 0  # a lookup alone is not a billed reuse
    kv.record_query(11, len(hit) * BS)
    assert (kv.stats.queries, kv.stats.hits) == (11, 8)
    assert all(kv.ref_count(b) == 1 for b in hit)
    assert kv.num_free_blocks == 6


def test_match_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    table = fill(kv, list(range(8)))
    kv.free(table)
    assert len(kv.match_prefix(list(range(8)), [])) == 1  # 8 tokens, exactly 2 blocks: only 1 reused


def test_divergent_suffix_shares_only_common_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = fill(kv, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    hit = kv.match_prefix([1, 2, 3, 4, 5, 6, 0, 8, 9], [])
    assert hit == a[:1]
    assert kv.ref_count(a[0]) == 2  # in use by both: protected


def test_in_use_blocks_are_never_evicted():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    table = fill(kv, list(range(8)))  # 2 blocks in use, indexed
    other = kv.allocate(2)
    assert set(other).isdisjoint(table)
    with pytest.raises(MemoryError):
        kv.allocate(1)
    kv.free(other)
    assert kv.num_cached_blocks == 2


def test_lru_eviction_order():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = fill(kv, [1, 1, 1, 1, 0])
    b = fill(kv, [2, 2, 2, 2, 0])
    kv.free(a)
    kv.free(b)  # a's cached block is older than b's
    kv.allocate(3)  # two uncached tails + one eviction: must be a's block (least recently used)
    assert kv.match_prefix([1, 1, 1, 1, 0], []) == []
    assert kv.match_prefix([2, 2, 2, 2, 0], []) == b[:1]


def test_touching_a_cached_block_refreshes_it():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = fill(kv, [1, 1, 1, 1])
    b = fill(kv, [2, 2, 2, 2])
    kv.free(a[:1]), kv.free(b[:1])
    kv.free(kv.match_prefix([1, 1, 1, 1, 5], []))  # a used again: now most recent
    kv.allocate(2)  # the free uncached block, then the LRU cached one (b)
    assert kv.match_prefix([1, 1, 1, 1, 5], []) == a[:1]


def test_no_prefix_caching_indexes_nothing():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    table = fill(kv, list(range(9)))
    kv.free(table)
    assert kv.num_cached_blocks == 0
    assert kv.match_prefix(list(range(9)), []) == []


def test_double_free_raises():
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    blocks = kv.allocate(1)
    kv.free(blocks)
    with pytest.raises(RuntimeError):
        kv.free(blocks)


def test_hash_chain_depends_on_whole_prefix():
    h1 = extend_block_hashes([], [1, 2, 3, 4, 5, 6, 7, 8], BS, 2)
    h2 = extend_block_hashes([], [0, 2, 3, 4, 5, 6, 7, 8], BS, 2)
    assert h1[1] != h2[1]  # same second block, different history
    assert extend_block_hashes(h1[:1], [1, 2, 3, 4, 5, 6, 7, 8], BS, 2) == h1


def test_many_requests_sharing_a_prefix_leak_nothing():
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    system = list(range(100, 116))  # 4 shared blocks
    tables = [fill(kv, system + [i, i + 1, i + 2]) for i in range(20)]
    assert all(t[:4] == tables[0][:4] for t in tables)
    assert kv.ref_count(tables[0][0]) == 20
    for t in tables:
        kv.free(t)
    assert kv.num_free_blocks == 64
    assert all(kv.ref_count(b) == 0 for b in range(64))


def constant_hash(parent: bytes, tokens) -> bytes:
    return b"every block collides"


def parentless_hash(parent: bytes, tokens) -> bytes:
    """A key of the block's tokens alone: the same block after different prefixes collides."""
    return array("q", tokens).tobytes()


def test_colliding_keys_never_serve_other_tokens():
    kv = KVCacheManager(num_blocks=16, block_size=BS, hash_fn=constant_hash)
    a = fill(kv, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert kv.num_cached_blocks == 1  # the second block's key collides with the first: kept private
    kv.free(a)
    assert kv.match_prefix([9, 9, 9, 9, 5, 6, 7, 8, 9], []) == []  # same key, other tokens: a miss
    hit = kv.match_prefix([1, 2, 3, 4, 0, 0, 0, 0, 9], [])
    assert hit == a[:1]  # the one genuinely equal block is still reused


def test_a_block_after_a_different_prefix_is_not_reused_when_keys_ignore_the_prefix():
    kv = KVCacheManager(num_blocks=16, block_size=BS, hash_fn=parentless_hash)
    a = fill(kv, [1, 1, 1, 1, 5, 6, 7, 8, 0])
    kv.free(a)
    assert kv.match_prefix([2, 2, 2, 2, 5, 6, 7, 8, 0], []) == []
    b = fill(kv, [2, 2, 2, 2, 5, 6, 7, 8, 0])
    assert b[1] != a[1]  # its second block is its own (the key was taken: it stays private)
    kv.free(b)
    assert kv.match_prefix([1, 1, 1, 1, 5, 6, 7, 8, 0], []) == a[:2]


def test_a_reincarnated_parent_invalidates_its_old_children():
    """The parent block is evicted and refilled with the same key's tokens... of another prefix:
    a child cached under the old parent must not verify against the new one."""
    kv = KVCacheManager(num_blocks=3, block_size=BS, hash_fn=parentless_hash)
    p, q, tail = fill(kv, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    kv.free([tail])
    kv.free([p])  # q stays in use; p is free and cached
    got = kv.allocate(2)  # the two free blocks: tail, and p (evicted: its contents are overwritten)
    assert p in got
    kv.free([b for b in got if b != p])
    kv.cache_full_blocks([p], [1, 2, 3, 4], 4, [])  # same tokens, but a new incarnation of the block
    kv.free([p])
    kv.free([q])
    assert kv.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9], []) == [p]  # q was computed after the old p


def test_blocks_after_a_duplicate_computed_beside_its_twin_stay_reachable():
    """Two requests share a prefix and run at once: B is admitted while A has indexed only part of
    it, so B computes its own copies of A's later prefix blocks (duplicates, kept private) and then
    its own blocks. B's own blocks must chain to the copies a lookup finds (A's), or B's next turn
    would find only the shared prefix (what agents running in parallel saw)."""
    kv = KVCacheManager(num_blocks=32, block_size=BS)
    shared = list(range(100, 116))  # 4 blocks
    a_tokens = shared + [1] * 8
    a_hashes: list[bytes] = []
    a_table = kv.allocate(kv.blocks_needed(len(a_tokens)))
    kv.cache_full_blocks(a_table, a_tokens, 8, a_hashes)  # A's first chunk: 2 blocks indexed
    b_tokens = shared + [2] * 8
    b_hashes: list[bytes] = []
    b_hit = kv.match_prefix(b_tokens, b_hashes)
    assert b_hit == a_table[:2]
    b_table = b_hit + kv.allocate(kv.blocks_needed(len(b_tokens)) - len(b_hit))
    start = kv.cache_full_blocks(a_table, a_tokens, len(a_tokens), a_hashes, 2)  # A finishes first
    assert start == 6
    kv.cache_full_blocks(b_table, b_tokens, len(b_tokens), b_hashes)  # blocks 2, 3 duplicate A's
    kv.free(a_table)
    kv.free(b_table)
    follow_up = b_tokens + [3] * 5  # B's next turn
    hit = kv.match_prefix(follow_up, [])
    assert hit == a_table[:4] + b_table[4:6], (hit, a_table, b_table)


def test_a_colliding_key_never_links_a_block_to_another_prefix():
    """With keys that ignore the parent (a forced collision), a private duplicate's twin may sit on
    another prefix: the block after the duplicate must not become reachable from that prefix."""
    kv = KVCacheManager(num_blocks=32, block_size=BS, hash_fn=lambda parent, tokens: bytes(array("q", tokens)))
    fill(kv, [1] * BS + [5] * BS + [0])  # A: 1111|5555 indexed
    b_table = fill(kv, [2] * BS + [5] * BS + [9] * BS + [0])  # B: its 5555 is a duplicate of A's key
    kv.free(b_table)
    hit = kv.match_prefix([1] * BS + [5] * BS + [9] * BS + [7], [])
    assert b_table[2] not in hit and len(hit) <= 2, hit
