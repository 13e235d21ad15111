"""KV cache: the block pool and per-request block tables (manager), paged storage and attention over it."""

from llminfer.kv_cache.block_pool import BlockPool, KVBlock
from llminfer.kv_cache.manager import KVCacheManager, KVCacheStats
from llminfer.kv_cache.paged import PagedAttentionBackend, PagedKVCache

__all__ = ["BlockPool", "KVBlock", "KVCacheManager", "KVCacheStats", "PagedAttentionBackend", "PagedKVCache"]
