"""KV held for sessions between requests: pinned blocks, handed to a request and taken back.

A session's context is a token list and the blocks that hold its KV. Between requests the
session holds one reference on each block, so the prefix cache's LRU eviction never takes them
(it only evicts blocks nobody references), and they count against the pool like any request's.
A request on the session takes the blocks over (no copy): the common prefix of its prompt and
the held tokens is its computed prefix, only the tail is computed. When the request ends -- done,
aborted, out of room -- the session takes the blocks back with whatever the request computed.

Writing into a block others read is never allowed. Where a prompt diverges inside a block, the
request writes the rest of that block in place when the session is its only holder (the prefix
cache forgets it first); when another request shares it, the reuse is rounded down to the
block's start and those few tokens are computed again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from layerserve.engine.kv_cache import KVCacheManager


@dataclass(slots=True, eq=False)
class HeldContext:
    """One session's KV between requests (and, while `in_use`, the request that has it)."""

    session_id: str
    token_ids: list[int] = field(default_factory=list)  # what the blocks hold (the last token may lack KV)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_kv: int = 0  # leading tokens whose KV is in the blocks
    num_indexed_blocks: int = 0
    in_use: object | None = None  # the Sequence that holds the blocks now
    closing: bool = False  # dropped while in use: the blocks are freed when the request ends

    def num_blocks(self, kv: KVCacheManager) -> int:
        """Blocks it holds; while a request has them, what the request will take for its prompt."""
        seq = self.in_use
        if seq is None:
            return len(self.block_table)
        return max(len(seq.block_table), kv.blocks_needed(seq.num_tokens + (0 if seq.prefill_only else 1)))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(slots=True)
class Attached:
    """What a request starts from when it takes a held context over."""

    block_table: list[int]
    block_hashes: list[bytes]
    num_computed: int
    num_indexed_blocks: int


def reusable_prefix(kv: KVCacheManager, ctx: HeldContext, prompt_ids: list[int], max_reuse: int) -> int:
    """How many leading prompt tokens the held KV serves (at most `max_reuse`)."""
    p = min(common_prefix(ctx.token_ids[:ctx.num_kv], prompt_ids), max_reuse)
    bs = kv.block_size
    if p % bs and p < ctx.num_kv:
        if not kv.make_private(ctx.block_table[p // bs]):  # shared: recompute its head rather than write into it
            p -= p % bs
    return p


def take_over(kv: KVCacheManager, ctx: HeldContext, prompt_ids: list[int], max_reuse: int) -> Attached:
    """Hand the held blocks that serve `prompt_ids` to a request; free the rest (the diverged part)."""
    p = reusable_prefix(kv, ctx, prompt_ids, max_reuse)
    keep = kv.blocks_needed(p)
    kv.free(ctx.block_table[keep:])
    attached = Attached(ctx.block_table[:keep], ctx.block_hashes[:p // kv.block_size], p,
                        min(ctx.num_indexed_blocks, p // kv.block_size))
    ctx.block_table = []
    ctx.block_hashes = []
    return attached


def give_back(kv: KVCacheManager, ctx: HeldContext, token_ids: list[int], block_table: list[int],
              block_hashes: list[bytes], num_computed: int, num_indexed_blocks: int) -> None:
    """The request is over: the context holds its blocks again (or frees them if it was dropped)."""
    ctx.in_use = None
    if ctx.closing:
        kv.free(block_table)
        return
    keep = kv.blocks_needed(num_computed)
    kv.free(block_table[keep:])  # blocks allocated ahead of tokens that were never computed
    ctx.token_ids = list(token_ids)
    ctx.block_table = list(block_table[:keep])
    ctx.block_hashes = list(block_hashes[:num_computed // kv.block_size])
    ctx.num_kv = num_computed
    ctx.num_indexed_blocks = min(num_indexed_blocks, num_computed // kv.block_size)
