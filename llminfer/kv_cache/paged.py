"""Paged KV storage, and the attention backend that stores into it and attends over it through the ops.

Each layer's keys and values live in one pool tensor [num_blocks, Hkv, block_size, D]; a sequence's
history is the concatenation of the blocks its block table lists. Heads before positions, so that one
head of one block is a contiguous [block_size, D] matrix that matmuls can read in place. New tokens are
written through a slot mapping (flat position block_id * block_size + offset). An int8 cache adds one
float32 scale per (block, head, position); each token's head vector is quantized when written and the
blocks attention reads are dequantized inside the op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llminfer.layers.attention import Attention, AttentionBackend, AttentionMetadata
from llminfer.ops import OpSet
from llminfer.ops.attention import gather_history, quantize_kv


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device, kv_cache_dtype: str = "auto") -> None:
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.quantized = kv_cache_dtype == "int8"
        self.dtype = dtype  # what attention computes in (int8 blocks are dequantized to it)
        # Zeroed, not empty: masked-out positions still pass through the value matmul (0 * NaN = NaN).
        storage = torch.int8 if self.quantized else dtype
        self.keys = [torch.zeros(shape, dtype=storage, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=storage, device=device) for _ in range(num_layers)]
        scales = (*shape[:-1], 1)
        self.key_scales = [torch.zeros(scales, device=device) if self.quantized else None for _ in range(num_layers)]
        self.value_scales = [torch.zeros(scales, device=device) if self.quantized else None
                             for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                        kv_cache_dtype: str = "auto") -> int:
        per_vector = head_dim + 4 if kv_cache_dtype == "int8" else head_dim * torch.finfo(dtype).bits // 8
        return 2 * num_layers * block_size * num_kv_heads * per_vector

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(keys, values, key scales, value scales) of one layer, as the attention ops take them."""
        return self.keys[index], self.values[index], self.key_scales[index], self.value_scales[index]

    def round_trip(self, values: torch.Tensor) -> torch.Tensor:
        """What reading `values` back from this cache gives: attention over fresh keys/values must see the same
        numbers as attention over cached ones."""
        if not self.quantized:
            return values
        q, scale = quantize_kv(values)
        return (q.float() * scale).to(values.dtype)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write of shared partial blocks, before the step writes into the copies."""
        if not copies:
            return
        device = self.keys[0].device
        src = torch.tensor([s for s, _ in copies], device=device)
        dst = torch.tensor([d for _, d in copies], device=device)
        for cache in (*self.keys, *self.values, *self.key_scales, *self.value_scales):
            if cache is not None:
                cache[dst] = cache[src]


@dataclass
class DecodeBatch:
    """What every layer's decode attention needs to know about the step's single-token sequences.
    Built once per step; the layers only differ in their caches."""

    block_tables: torch.Tensor  # [B, nb] blocks in use (nb covers the longest sequence)
    context_lens: torch.Tensor  # int64 [B]
    num_shared: int  # leading columns naming the same full block for every sequence

    @classmethod
    def build(cls, block_tables: torch.Tensor, context_lens: list[int], block_size: int) -> "DecodeBatch":
        used = block_tables[:, : -(-max(context_lens) // block_size)]
        shared = 0
        if used.shape[0] > 1:
            same = (used == used[:1]).all(dim=0)[: min(context_lens) // block_size]
            shared = int(same.cumprod(0).sum()) if same.numel() else 0
        return cls(used, torch.tensor(context_lens, device=block_tables.device), shared)


@dataclass
class StepPlan:
    slot_blocks: torch.Tensor  # [T] where each new token's key/value goes
    slot_offsets: torch.Tensor
    decodes: list[int]  # sequences with one new token
    decode_rows: torch.Tensor  # their rows in the flattened batch
    batch: DecodeBatch | None
    pure_decode: bool  # every sequence decodes: the whole step is one paged-attention call


class PagedAttentionBackend(AttentionBackend):
    """Prefill chunks: `prefill_attention` per sequence over its cached prefix plus the chunk. Single-token
    decodes: one `paged_decode_attention` call for all of them. New keys/values: `write_kv`."""

    def __init__(self, cache: PagedKVCache, ops: OpSet) -> None:
        self.cache, self.ops = cache, ops
        self._step: tuple[AttentionMetadata, StepPlan] | None = None

    def _plan(self, metadata: AttentionMetadata, device: torch.device) -> StepPlan:
        """Where this step's keys/values go and which rows are single-token decodes: derived once per step,
        not once per layer."""
        if self._step is None or self._step[0] is not metadata:
            decodes = [i for i, n in enumerate(metadata.query_lens) if n == 1]
            rows = torch.tensor([metadata.query_start_loc[i] for i in decodes], device=device)
            batch = DecodeBatch.build(metadata.block_tables[decodes], [metadata.context_lens[i] for i in decodes],
                                      self.cache.block_size) if decodes else None
            slots = metadata.slot_mapping
            plan = StepPlan(slots // self.cache.block_size, slots % self.cache.block_size, decodes, rows, batch,
                            pure_decode=len(decodes) == metadata.num_seqs)
            self._step = (metadata, plan)
        return self._step[1]

    def use_plan(self, metadata: AttentionMetadata | None, plan: StepPlan | None) -> None:
        """Have the layers read this plan for `metadata` (a recorded step's fixed tensors); (None, None) forgets it."""
        self._step = (metadata, plan) if metadata is not None else None

    def _decode(self, layer: Attention, q: torch.Tensor, batch: DecodeBatch) -> torch.Tensor:
        return self.ops.paged_decode_attention(q, *self.cache.layer(layer.layer_idx), batch.block_tables,
                                               batch.context_lens, batch.num_shared, layer.scale,
                                               layer.sliding_window)

    def forward(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        keys, values, key_scales, value_scales = self.cache.layer(layer.layer_idx)
        plan = self._plan(metadata, q.device)
        self.ops.write_kv(keys, values, key_scales, value_scales, plan.slot_blocks, plan.slot_offsets, k, v)
        if plan.pure_decode:
            return self._decode(layer, q, plan.batch)
        starts, query_lens = metadata.query_start_loc, metadata.query_lens
        out = torch.empty_like(q)
        if plan.decodes:
            out[plan.decode_rows] = self._decode(layer, q[plan.decode_rows], plan.batch)
        for i, q_len in enumerate(query_lens):
            if q_len > 1:
                rows = slice(starts[i], starts[i + 1])
                length = metadata.context_lens[i]
                if q_len == length:  # a whole prompt: its history is exactly this chunk
                    history_k = self.cache.round_trip(k[rows].transpose(0, 1))  # as a later read would see it
                    history_v = self.cache.round_trip(v[rows].transpose(0, 1))
                else:
                    history_k = gather_history(keys, key_scales, metadata.block_tables[i], length, q.dtype)
                    history_v = gather_history(values, value_scales, metadata.block_tables[i], length, q.dtype)
                out[rows] = self.ops.prefill_attention(q[rows], history_k, history_v, layer.scale,
                                                       layer.sliding_window)
        return out
