"""KV cache: the block pool and per-request block tables (manager), paged storage and attention over it."""

from __future__ import annotations

from llminfer.errors import ConfigError
from llminfer.kv_cache.block_pool import BlockPool, KVBlock
from llminfer.kv_cache.manager import KVCacheManager, KVCacheStats
from llminfer.kv_cache.paged import PagedAttentionBackend, PagedKVCache
from llminfer.layers.attention import AttentionBackend
from llminfer.ops import OpSet

# EngineConfig.attention_backend -> the class the engine's runner attends through: (cache, ops) -> backend
ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {"paged": PagedAttentionBackend}


def attention_backend(name: str, cache: PagedKVCache, ops: OpSet) -> AttentionBackend:
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention backend '{name}' is not available (expected one of "
                          f"{', '.join(ATTENTION_BACKENDS)})")
    return ATTENTION_BACKENDS[name](cache, ops)


__all__ = ["ATTENTION_BACKENDS", "BlockPool", "KVBlock", "KVCacheManager", "KVCacheStats", "PagedAttentionBackend",
           "PagedKVCache", "attention_backend"]
