"""The pool of KV blocks: reference counts, a prefix index of full blocks, LRU reuse of freed ones.

A block with reference count 0 is free. If it still carries a hash it also stays in the prefix
index, so a later request with the same prefix can take it back without recomputing; the least
recently freed of those is the first to be reused for new content (LRU eviction). The index holds
no references: only block tables do.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set once the block is full and registered in the prefix index


def hash_block(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """Chained content hash of a full block: equal hashes mean equal prefixes (SHA-256, not Python's hash)."""
    return hashlib.sha256(parent_hash + np.asarray(token_ids, dtype=np.int64).tobytes()).digest()


def root_hash(model_identity: str) -> bytes:
    """The parent of every first block: prefixes of different models never match."""
    return hashlib.sha256(model_identity.encode()).digest()


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)  # LRU first
        self.prefix_index: dict[bytes, KVBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def allocate(self, count: int) -> list[KVBlock]:
        if count > len(self.free_queue):
            raise RuntimeError(f"asked for {count} KV blocks, {len(self.free_queue)} free")
        allocated = []
        for _ in range(count):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:  # evict: its old content is about to be overwritten
                del self.prefix_index[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            allocated.append(block)
        return allocated

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self.prefix_index.get(block_hash)

    def take(self, block: KVBlock) -> None:
        """Add a reference to a block found in the prefix index (free or in use)."""
        if block.ref_count == 0:
            del self.free_queue[block.block_id]
        block.ref_count += 1

    def release(self, block: KVBlock) -> None:
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block.block_id] = block  # most recently freed: reused last

    def register(self, block: KVBlock, block_hash: bytes) -> None:
        """Publish a full block under its prefix hash (unless an identical block is already published)."""
        if block.block_hash is None and block_hash not in self.prefix_index:
            block.block_hash = block_hash
            self.prefix_index[block_hash] = block

    def check_invariants(self, block_tables: Sequence[Sequence[KVBlock]]) -> None:
        """Raise AssertionError if the pool's bookkeeping is inconsistent (used by tests after every step)."""
        references: dict[int, int] = {}
        for table in block_tables:
            for block in table:
                references[block.block_id] = references.get(block.block_id, 0) + 1
        for block in self.blocks:
            assert block.ref_count == references.get(block.block_id, 0), \
                f"block {block.block_id}: ref_count {block.ref_count}, referenced {references.get(block.block_id, 0)}x"
            assert (block.ref_count == 0) == (block.block_id in self.free_queue), f"block {block.block_id} free-list"
        used = sum(1 for b in self.blocks if b.ref_count > 0)
        assert used + len(self.free_queue) == len(self.blocks), "free + used != total"
        for block_hash, block in self.prefix_index.items():
            assert block.block_hash == block_hash, f"index entry points at reused block {block.block_id}"
