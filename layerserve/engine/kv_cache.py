"""KV block pool: reference counts, prefix cache (hash chain per block), LRU eviction.

No tensors here: blocks are ids into the runner's KV pool, so the cache is unit-testable alone.

Why a hash chain (vLLM) rather than a radix tree (SGLang): with fixed-size blocks, a full block's
identity is (its parent's identity, its tokens), so one dict lookup per block finds the longest
cached prefix, eviction is a plain LRU over free blocks, and there are no tree nodes to split or merge.

Keys never decide a hit alone. A block is found by its chain key (a BLAKE2b digest of the parent's
key and the block's tokens), then verified: its stored tokens must equal the tokens asked for and
its stored parent must be the very block (and incarnation) matched just before it. Two prefixes
whose keys collide -- by accident, or a prompt crafted against a weak hash (vLLM's CVE-2025-25183)
-- therefore never share KV: the second one is simply not cached.

Lifecycle of a block:
    free (no hash) --allocate--> in use --becomes full & computed--> in use + hashed (shareable)
    in use --ref drops to 0--> free but cached (evictable, LRU order) --allocate--> hash dropped (evicted)
    free but cached --match_prefix hit--> in use again (ref 1)
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

BlockHashFn = Callable[[bytes, Sequence[int]], bytes]  # (parent's key, this block's tokens) -> key
# What a cached block holds: (parent block id and its incarnation, or None at the root; its tokens).
BlockContent = tuple[tuple[int, int] | None, tuple[int, ...]]


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """A block's key: BLAKE2b-128 of its parent's key and its token ids."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def extend_block_hashes(hashes: list[bytes], token_ids: Sequence[int], block_size: int, num_blocks: int,
                        hash_fn: BlockHashFn = chain_hash) -> list[bytes]:
    """Extend `hashes` (in place) to the chained keys of the first `num_blocks` full blocks.

    Each sequence keeps its list, so a step hashes only the blocks that became full.
    """
    num_blocks = min(num_blocks, len(token_ids) // block_size)
    parent = hashes[-1] if hashes else b""
    for b in range(len(hashes), num_blocks):
        parent = hash_fn(parent, token_ids[b * block_size:(b + 1) * block_size])
        hashes.append(parent)
    return hashes


@dataclass(slots=True)
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens found in the cache


@dataclass
class KVCacheManager:
    """Owns the block ids of the pool. Sequences hold lists of block ids (block tables)."""

    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    hash_fn: BlockHashFn = chain_hash  # injectable so tests can force collisions

    def __post_init__(self) -> None:
        self._ref = [0] * self.num_blocks
        self._hash: list[bytes | None] = [None] * self.num_blocks
        self._content: list[BlockContent | None] = [None] * self.num_blocks  # set while a block is cached
        self._incarnation = [0] * self.num_blocks  # bumped each time a block is handed out afresh
        self._cached: dict[bytes, int] = {}  # block key -> block id
        # Blocks with ref 0, least recently used first. Values unused.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(self.num_blocks))

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, including cached-but-evictable ones)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        """Fraction of blocks held by running sequences (cached, evictable blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache --------------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int], hashes: list[bytes]) -> list[int]:
        """Block ids of the longest cached prefix of full blocks, taking a reference on each.

        `hashes` is the sequence's own key list (extended in place). A key only finds a candidate:
        it is a hit when the block holds exactly these tokens after exactly the block matched
        before it. At least one token is always left uncached so the caller has a token to compute
        (its logits are needed to sample). Counts nothing: see `record_query`.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (len(token_ids) - 1) // bs
        blocks: list[int] = []
        parent: tuple[int, int] | None = None
        for b, h in enumerate(extend_block_hashes(hashes, token_ids, bs, max_blocks, self.hash_fn)[:max_blocks]):
            block = self._cached.get(h)
            if block is None or self._content[block] != (parent, tuple(token_ids[b * bs:(b + 1) * bs])):
                break
            blocks.append(block)
            parent = (block, self._incarnation[block])
        for block in blocks:
            self._take(block)
        return blocks

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one request's prompt lookup (once per request, when it is admitted)."""
        self.stats.queries += num_tokens
        self.stats.hits += num_hit_tokens

    def cache_full_blocks(
        self, block_table: Sequence[int], token_ids: Sequence[int], num_computed: int, hashes: list[bytes], start: int = 0
    ) -> int:
        """Index the blocks of `block_table` that are full and computed, so others can reuse them.

        `hashes` is the sequence's hash list, extended in place; blocks before `start` were handled
        on an earlier call. Returns the new `start` (number of full, computed blocks).
        """
        num_full = min(num_computed // self.block_size, len(block_table))
        if not self.enable_prefix_caching or num_full <= start:
            return max(start, num_full)
        bs = self.block_size
        extend_block_hashes(hashes, token_ids, bs, num_full, self.hash_fn)
        for b in range(start, num_full):
            block, h = block_table[b], hashes[b]
            if self._hash[block] is not None:
                continue  # already indexed (shared prefix or indexed on an earlier step)
            if h in self._cached:
                continue  # an identical block (or a colliding key) is indexed already; this copy stays private
            parent = None if b == 0 else self._parent_of(block_table, token_ids, hashes, b - 1)
            self._hash[block] = h
            self._content[block] = (parent, tuple(token_ids[b * bs:(b + 1) * bs]))
            self._cached[h] = block
        return num_full

    def _parent_of(self, block_table: Sequence[int], token_ids: Sequence[int], hashes: list[bytes],
                   b: int) -> tuple[int, int]:
        """The parent to index block b+1 under: the block a lookup of this sequence's tokens reaches
        at block b. That is not always its own block b: a private duplicate (computed beside an
        indexed twin) is never reached, its twin is. Found by walking back to a block indexed as
        itself (or the root) and forward again through the index, verifying each step as
        match_prefix does; a walk that fails means block b+1 cannot be reached, and its own block
        is as good a parent as any."""
        own = (block_table[b], self._incarnation[block_table[b]])
        start = b
        while start >= 0 and self._hash[block_table[start]] != hashes[start]:
            start -= 1
        if start == b:
            return own
        bs = self.block_size
        parent = None if start < 0 else (block_table[start], self._incarnation[block_table[start]])
        for k in range(start + 1, b + 1):
            indexed = self._cached.get(hashes[k])
            if indexed is None or self._content[indexed] != (parent, tuple(token_ids[k * bs:(k + 1) * bs])):
                return own
            parent = (indexed, self._incarnation[indexed])
        return parent

    # ---- allocation ----------------------------------------------------------------------
    def allocate(self, count: int) -> list[int]:
        """Take `count` fresh blocks, evicting least recently used cached ones. Caller checks room."""
        if count > len(self._free):
            raise MemoryError(f"KV pool exhausted: need {count} blocks, {len(self._free)} free")
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            h = self._hash[block]
            if h is not None:  # evict: its contents are about to be overwritten
                del self._cached[h]
                self._hash[block] = None
                self._content[block] = None
            self._incarnation[block] += 1  # children cached under its old contents no longer verify
            self._ref[block] = 1
            blocks.append(block)
        return blocks

    def share(self, blocks: Sequence[int]) -> None:
        """Take one more reference on blocks another sequence holds (n>1 forks)."""
        for block in blocks:
            self._take(block)

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block. Freed blocks stay cached; the tail is evicted first."""
        for block in reversed(blocks):
            self._ref[block] -= 1
            if self._ref[block] < 0:
                raise RuntimeError(f"block {block} freed twice")
            if self._ref[block] == 0:
                if self._hash[block] is None:
                    self._free[block] = None
                    self._free.move_to_end(block, last=False)  # uncached: hand out before cached ones
                else:
                    self._free[block] = None  # most recently used end

    def _take(self, block: int) -> None:
        if self._ref[block] == 0:
            del self._free[block]
        self._ref[block] += 1

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def make_private(self, block: int) -> bool:
        """Let the one owner of an indexed block write into it: the prefix cache forgets it (and
        its children cached after it stop verifying). False when others reference it too."""
        if self._ref[block] != 1:
            return False
        h = self._hash[block]
        if h is not None:
            del self._cached[h]
            self._hash[block] = None
            self._content[block] = None
            self._incarnation[block] += 1
        return True
