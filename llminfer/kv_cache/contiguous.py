"""A contiguous KV cache: one fixed-length row ("slot") per running sequence.

Simple and exact; it reserves max_len positions per sequence. The paged cache replaces it for
serving many sequences of unequal length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llminfer.errors import PromptTooLongError
from llminfer.layers.attention import Attention, AttentionBackend, AttentionMetadata, visibility_mask


class ContiguousKVCache:
    """Keys and values of every layer: [num_slots, max_len, Hkv, D] each."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device) -> None:
        shape = (num_slots, max_len, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots, self.max_len = num_slots, max_len
        self._free_slots = list(range(num_slots - 1, -1, -1))

    def allocate_slot(self) -> int | None:
        return self._free_slots.pop() if self._free_slots else None

    def free_slot(self, slot: int) -> None:
        self._free_slots.append(slot)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)


class ContiguousAttentionBackend(AttentionBackend):
    """Writes new K/V into each sequence's slot, then attends with torch SDPA.

    Prefill of a fresh sequence uses SDPA's causal path (flash attention where the device has it);
    a batch of single-token decodes is attended in one padded, masked call.
    """

    def __init__(self, cache: ContiguousKVCache) -> None:
        self.cache = cache

    def forward(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        keys, values = self.cache.keys[layer.layer_idx], self.cache.values[layer.layer_idx]
        self._store(keys, values, k, v, metadata)
        if metadata.is_pure_decode:
            return self._decode(layer, q, keys, values, metadata)
        return self._prefill(layer, q, keys, values, metadata)

    def _store(self, keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               metadata: AttentionMetadata) -> None:
        starts = metadata.query_start_loc
        for i, (slot, ctx_len) in enumerate(zip(metadata.cache_slots, metadata.context_lens)):
            if ctx_len > self.cache.max_len:
                raise PromptTooLongError(f"sequence needs {ctx_len} cache positions, cache holds {self.cache.max_len}")
            first = ctx_len - (starts[i + 1] - starts[i])
            keys[slot, first:ctx_len] = k[starts[i]:starts[i + 1]]
            values[slot, first:ctx_len] = v[starts[i]:starts[i + 1]]

    def _prefill(self, layer: Attention, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 metadata: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        starts = metadata.query_start_loc
        for i, (slot, ctx_len) in enumerate(zip(metadata.cache_slots, metadata.context_lens)):
            q_len = starts[i + 1] - starts[i]
            qi = q[starts[i]:starts[i + 1]].transpose(0, 1)  # [Hq, q_len, D]
            ki = keys[slot, :ctx_len].transpose(0, 1)  # [Hkv, ctx_len, D]
            vi = values[slot, :ctx_len].transpose(0, 1)
            window_matters = layer.sliding_window is not None and ctx_len > layer.sliding_window
            if q_len == ctx_len and not window_matters:
                oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=layer.scale, enable_gqa=True)
            else:
                positions = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
                mask = visibility_mask(positions, ctx_len, layer.sliding_window)
                oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=layer.scale, enable_gqa=True)
            out[starts[i]:starts[i + 1]] = oi.transpose(0, 1)
        return out

    def _decode(self, layer: Attention, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        longest = max(metadata.context_lens)
        first, slots = metadata.cache_slots[0], metadata.cache_slots
        if slots == list(range(first, first + len(slots))):  # the usual case: a view, no copy of the cache
            ki, vi = keys[first:first + len(slots), :longest], values[first:first + len(slots), :longest]
        else:
            index = torch.tensor(slots, device=q.device)
            ki, vi = keys[index, :longest], values[index, :longest]
        ki, vi = ki.transpose(1, 2), vi.transpose(1, 2)  # [B, Hkv, L, D]
        # One query per sequence: grouped heads become a [G, D] x [D, L] matmul per KV head. Plain
        # matmuls beat SDPA's flash kernel here (no tiling to amortise), in float32 and bfloat16 alike.
        batch, group = len(slots), layer.num_heads // layer.num_kv_heads
        qi = q.view(batch, layer.num_kv_heads, group, layer.head_dim)  # [B, Hkv, G, D]
        scores = torch.matmul(qi, ki.transpose(2, 3)).float() * layer.scale  # [B, Hkv, G, L]
        window_cuts = layer.sliding_window is not None and longest > layer.sliding_window
        if window_cuts or min(metadata.context_lens) != longest:
            positions = torch.tensor(metadata.context_lens, device=q.device) - 1  # each query's own position
            visible = visibility_mask(positions, longest, layer.sliding_window)  # [B, L]
            scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1).to(vi.dtype), vi)  # [B, Hkv, G, D]
        return out.reshape(batch, layer.num_heads, layer.head_dim)
