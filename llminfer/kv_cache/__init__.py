"""KV cache storage and the attention backends that read and write it."""

from llminfer.kv_cache.contiguous import ContiguousAttentionBackend, ContiguousKVCache

__all__ = ["ContiguousAttentionBackend", "ContiguousKVCache"]
