"""Paged KV storage and attention over it.

Each layer's keys and values live in one pool tensor [num_blocks, block_size, Hkv, D]; a sequence's
history is the concatenation of the blocks its block table lists. New tokens are written through a
slot mapping (flat position block_id * block_size + offset), so writing never cares about order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llminfer.layers.attention import Attention, AttentionBackend, AttentionMetadata, visibility_mask


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device) -> None:
        # Zeroed, not empty: masked-out positions still pass through the value matmul (0 * NaN = NaN).
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write of shared partial blocks, before the step writes into the copies."""
        if not copies:
            return
        device = self.keys[0].device
        src = torch.tensor([s for s, _ in copies], device=device)
        dst = torch.tensor([d for _, d in copies], device=device)
        for cache in (*self.keys, *self.values):
            cache[dst] = cache[src]


def gather_history(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached positions of one sequence: [length, Hkv, D] (a copy)."""
    blocks = -(-length // cache.shape[1])
    return cache[block_table[:blocks]].flatten(0, 1)[:length]


def paged_decode_attention_reference(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: list[int], scale: float,
                                     sliding_window: int | None = None) -> torch.Tensor:
    """Plain per-sequence attention for one query each: q [B, Hq, D] -> [B, Hq, D]. The readable version."""
    out = torch.empty_like(q)
    for i, length in enumerate(context_lens):
        keys = gather_history(key_cache, block_tables[i], length).float()  # [L, Hkv, D]
        values = gather_history(value_cache, block_tables[i], length).float()
        group = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)  # [L, Hq, D]
        scores = torch.einsum("hd,lhd->hl", q[i].float(), keys) * scale  # [Hq, L]
        if sliding_window is not None:
            scores[:, : max(0, length - sliding_window)] = float("-inf")
        out[i] = torch.einsum("hl,lhd->hd", scores.softmax(dim=-1), values).to(q.dtype)
    return out


def paged_decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: list[int], scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    """One query per sequence over block tables of unequal lengths, batched: q [B, Hq, D] -> [B, Hq, D].

    Only the blocks each sequence uses are read (a batch-wide gather of block_tables[:, :max_blocks]),
    then grouped-query heads become one [G, D] x [D, L] matmul per KV head, masked by length.
    """
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    longest = max(context_lens)
    used = block_tables[:, : -(-longest // block_size)]
    keys = key_cache[used].flatten(1, 2).transpose(1, 2)  # [B, Hkv, L', D]
    values = value_cache[used].flatten(1, 2).transpose(1, 2)
    grouped = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, Hkv, G, D]
    scores = torch.matmul(grouped, keys.transpose(2, 3)).float() * scale  # [B, Hkv, G, L']
    positions = torch.tensor(context_lens, device=q.device) - 1
    visible = visibility_mask(positions, scores.shape[-1], sliding_window)  # [B, L']
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1).to(values.dtype), values)  # [B, Hkv, G, D]
    return out.reshape(batch, num_heads, head_dim)


class PagedAttentionBackend(AttentionBackend):
    """Prefill chunks: SDPA per sequence over its cached prefix plus the chunk (flash kernel, causal when
    the chunk is the whole sequence). Single-token decodes: one batched paged-attention call."""

    def __init__(self, cache: PagedKVCache, reference: bool = False) -> None:
        self.cache = cache
        self.decode_attention = paged_decode_attention_reference if reference else paged_decode_attention

    def forward(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        keys, values = self.cache.keys[layer.layer_idx], self.cache.values[layer.layer_idx]
        keys.view(-1, *keys.shape[2:]).index_copy_(0, metadata.slot_mapping, k)
        values.view(-1, *values.shape[2:]).index_copy_(0, metadata.slot_mapping, v)
        starts, query_lens = metadata.query_start_loc, metadata.query_lens
        decodes = [i for i, n in enumerate(query_lens) if n == 1]
        out = torch.empty_like(q)
        if decodes:
            rows = torch.tensor([starts[i] for i in decodes], device=q.device)
            out[rows] = self.decode_attention(q[rows], keys, values, metadata.block_tables[decodes],
                                              [metadata.context_lens[i] for i in decodes], layer.scale,
                                              layer.sliding_window)
        for i, q_len in enumerate(query_lens):
            if q_len > 1:
                out[starts[i]:starts[i + 1]] = self._prefill(layer, q[starts[i]:starts[i + 1]], keys, values,
                                                             metadata.block_tables[i], metadata.context_lens[i])
        return out

    def _prefill(self, layer: Attention, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 block_table: torch.Tensor, length: int) -> torch.Tensor:
        q_len = q.shape[0]
        qi = q.transpose(0, 1)  # [Hq, q_len, D]
        ki = gather_history(keys, block_table, length).transpose(0, 1)  # [Hkv, L, D]
        vi = gather_history(values, block_table, length).transpose(0, 1)
        window_matters = layer.sliding_window is not None and length > layer.sliding_window
        if q_len == length and not window_matters:
            out = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=layer.scale, enable_gqa=True)
        else:  # a chunk after a cached prefix: query i sits at position length - q_len + i
            positions = torch.arange(length - q_len, length, device=q.device)
            mask = visibility_mask(positions, length, layer.sliding_window)
            out = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=layer.scale, enable_gqa=True)
        return out.transpose(0, 1)
