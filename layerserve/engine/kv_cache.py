"""KV block pool: reference counts, prefix cache (hash chain per block), LRU eviction.

No tensors here: blocks are ids into the runner's KV pool, so the cache is unit-testable alone.

Why a hash chain (vLLM) rather than a radix tree (SGLang): with fixed-size blocks, a full block's
identity is (its parent's identity, its tokens), so one dict lookup per block finds the longest
cached prefix, eviction is a plain LRU over free blocks, and there are no tree nodes to split or merge.

Lifecycle of a block:
    free (no hash) --allocate--> in use --becomes full & computed--> in use + hashed (shareable)
    in use --ref drops to 0--> free but cached (evictable, LRU order) --allocate--> hash dropped (evicted)
    free but cached --match_prefix hit--> in use again (ref 1)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

BlockKey = tuple[int, tuple[int, ...]]  # (parent block's hash, this block's tokens)


def extend_block_hashes(hashes: list[int], token_ids: Sequence[int], block_size: int, num_blocks: int) -> list[int]:
    """Extend `hashes` (in place) to the chained hashes of the first `num_blocks` full blocks.

    Each sequence keeps its list, so a step hashes only the blocks that became full.
    """
    num_blocks = min(num_blocks, len(token_ids) // block_size)
    parent = hashes[-1] if hashes else 0
    for b in range(len(hashes), num_blocks):
        parent = hash((parent, tuple(token_ids[b * block_size:(b + 1) * block_size])))
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

    def __post_init__(self) -> None:
        self._ref = [0] * self.num_blocks
        self._hash: list[int | None] = [None] * self.num_blocks
        self._cached: dict[int, int] = {}  # block hash -> block id
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
    def match_prefix(self, token_ids: Sequence[int], hashes: list[int]) -> list[int]:
        """Block ids of the longest cached prefix of full blocks, taking a reference on each.

        `hashes` is the sequence's own hash list (extended in place). At least one token is always
        left uncached so the caller has a token to compute (its logits are needed to sample).
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        self.stats.queries += len(token_ids)
        blocks: list[int] = []
        for h in extend_block_hashes(hashes, token_ids, self.block_size, max_blocks)[:max_blocks]:
            block = self._cached.get(h)
            if block is None:
                break
            blocks.append(block)
        for block in blocks:
            self._take(block)
        self.stats.hits += len(blocks) * self.block_size
        return blocks

    def cache_full_blocks(
        self, block_table: Sequence[int], token_ids: Sequence[int], num_computed: int, hashes: list[int], start: int = 0
    ) -> int:
        """Index the blocks of `block_table` that are full and computed, so others can reuse them.

        `hashes` is the sequence's hash list, extended in place; blocks before `start` were handled
        on an earlier call. Returns the new `start` (number of full, computed blocks).
        """
        num_full = min(num_computed // self.block_size, len(block_table))
        if not self.enable_prefix_caching or num_full <= start:
            return max(start, num_full)
        extend_block_hashes(hashes, token_ids, self.block_size, num_full)
        for block, h in zip(block_table[start:num_full], hashes[start:num_full]):
            if self._hash[block] is not None:
                continue  # already indexed (shared prefix or indexed on an earlier step)
            if h in self._cached:
                continue  # an identical block is indexed already; this copy stays private
            self._hash[block] = h
            self._cached[h] = block
        return num_full

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
