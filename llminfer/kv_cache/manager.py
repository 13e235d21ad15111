"""Per-request block tables over the block pool: prefix reuse, allocation, copy-on-write, freeing.

The scheduler asks this manager one question per request per step, "can this request store N more
tokens?", and the manager answers by growing the request's block table (or says no, and the
scheduler preempts someone). Every full block is hashed over its parent's hash and its token ids,
so a new request can start from blocks another request already computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from llminfer.kv_cache.block_pool import BlockPool, KVBlock, hash_block, root_hash


class KVRequest(Protocol):
    request_id: str
    num_computed_tokens: int

    @property
    def all_token_ids(self) -> list[int]: ...


@dataclass
class KVCacheStats:
    block_size: int
    total_blocks: int
    free_blocks: int
    used_blocks: int
    peak_used_blocks: int
    prefix_cache_hit_tokens: int
    prefix_cache_queried_tokens: int

    @property
    def prefix_cache_hit_rate(self) -> float:
        queried = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / queried if queried else 0.0


@dataclass
class _Table:
    blocks: list[KVBlock] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # hashes of the first len(hashes) blocks (all full)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, model_identity: str = "",
                 enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._root = root_hash(model_identity)
        self._tables: dict[str, _Table] = {}
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies the runner must do first
        self._in_flight: set[bytes] = set()  # hashes of blocks being computed in the current step
        self.hit_tokens = self.queried_tokens = 0
        self.peak_used_blocks = 0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[KVBlock]:
        return self._tables[request_id].blocks

    # --- prefix reuse -------------------------------------------------------------------------

    def find_cached_prefix(self, request: KVRequest) -> list[KVBlock]:
        """Cached blocks that hold the longest prefix of the request's tokens (its last token excluded:
        it must be computed to get logits)."""
        if not self.enable_prefix_caching:
            return []
        tokens = request.all_token_ids
        found, parent = [], self._root
        for start in range(0, len(tokens) - 1 - self.block_size + 1, self.block_size):
            parent = hash_block(parent, tokens[start:start + self.block_size])
            block = self.pool.lookup(parent)
            if block is None:
                break
            found.append(block)
        return found

    def begin_step(self) -> None:
        self._in_flight.clear()

    def note_in_flight(self, request: KVRequest, num_tokens_after_step: int) -> None:
        """Remember which full blocks this step will compute for the request."""
        if not self.enable_prefix_caching:
            return
        table, tokens = self._tables[request.request_id], request.all_token_ids
        parent = table.hashes[-1] if table.hashes else self._root
        for i in range(len(table.hashes), num_tokens_after_step // self.block_size):
            parent = hash_block(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
            self._in_flight.add(parent)

    def prefix_in_flight(self, request: KVRequest, cached_prefix: Sequence[KVBlock]) -> bool:
        """Whether the first block the request would compute is being computed by another request now:
        waiting one step turns that block into a prefix-cache hit instead of duplicate work."""
        if not self.enable_prefix_caching:
            return False
        start, tokens = len(cached_prefix) * self.block_size, request.all_token_ids
        if start + self.block_size > len(tokens) - 1:
            return False
        parent = cached_prefix[-1].block_hash if cached_prefix else self._root
        return hash_block(parent, tokens[start:start + self.block_size]) in self._in_flight

    # --- allocation ---------------------------------------------------------------------------

    def allocate(self, request: KVRequest, num_new_tokens: int, cached_prefix: Sequence[KVBlock] = ()) -> bool:
        """Make room for num_new_tokens more tokens (after any cached prefix). False if the pool is short."""
        table = self._tables.setdefault(request.request_id, _Table())
        num_computed = request.num_computed_tokens + len(cached_prefix) * self.block_size
        have = len(table.blocks) + len(cached_prefix)
        new_blocks = max(0, self.blocks_needed(num_computed + num_new_tokens) - have)
        copy_on_write = self._writes_into_shared_block(table, num_computed) and not cached_prefix
        revived = sum(1 for b in cached_prefix if b.ref_count == 0)  # cached but free: taking them uses free slots
        if new_blocks + copy_on_write + revived > self.pool.num_free_blocks:
            if not table.blocks:
                del self._tables[request.request_id]
            return False
        for block in cached_prefix:
            self.pool.take(block)
            table.blocks.append(block)
            table.hashes.append(block.block_hash)
        if copy_on_write:
            shared = table.blocks[-1]
            private = self.pool.allocate(1)[0]
            self.pending_copies.append((shared.block_id, private.block_id))
            self.pool.release(shared)
            table.blocks[-1] = private
        table.blocks.extend(self.pool.allocate(new_blocks))
        self.peak_used_blocks = max(self.peak_used_blocks, self.pool.num_blocks - self.pool.num_free_blocks)
        return True

    def _writes_into_shared_block(self, table: _Table, num_computed: int) -> bool:
        # The next token lands in the last block; if that block is partly filled and shared
        # (a forked sample), writing would change the other owners' history.
        return bool(table.blocks) and num_computed % self.block_size != 0 and table.blocks[-1].ref_count > 1

    def record_prefix_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.queried_tokens += num_prompt_tokens
        self.hit_tokens += num_hit_tokens

    def cache_full_blocks(self, request: KVRequest) -> None:
        """Publish the request's newly completed blocks in the prefix index."""
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(request.request_id)
        if table is None:
            return
        full = request.num_computed_tokens // self.block_size
        if full <= len(table.hashes):  # most decode steps complete no block
            return
        tokens = request.all_token_ids
        for i in range(len(table.hashes), full):
            parent = table.hashes[-1] if table.hashes else self._root
            block_hash = hash_block(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
            self.pool.register(table.blocks[i], block_hash)
            table.hashes.append(block_hash)

    def fork(self, parent: KVRequest, child: KVRequest) -> None:
        """The child shares every block of the parent (the last, partial one is copied when first written)."""
        source = self._tables[parent.request_id]
        for block in source.blocks:
            self.pool.take(block)
        self._tables[child.request_id] = _Table(list(source.blocks), list(source.hashes))

    def free(self, request: KVRequest) -> None:
        table = self._tables.pop(request.request_id, None)
        if table is None:
            return
        for block in reversed(table.blocks):  # tail blocks, the least shareable, become the first to be evicted
            self.pool.release(block)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    # --- introspection ------------------------------------------------------------------------

    def stats(self) -> KVCacheStats:
        free = self.pool.num_free_blocks
        return KVCacheStats(self.block_size, self.pool.num_blocks, free, self.pool.num_blocks - free,
                            self.peak_used_blocks, self.hit_tokens, self.queried_tokens)

    def check_invariants(self) -> None:
        self.pool.check_invariants([t.blocks for t in self._tables.values()])
        for request_id, table in self._tables.items():
            for block, block_hash in zip(table.blocks, table.hashes):
                assert block.block_hash in (None, block_hash), f"{request_id}: block {block.block_id} hash changed"
