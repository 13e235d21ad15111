"""Paged KV storage and attention over it.

Each layer's keys and values live in one pool tensor [num_blocks, Hkv, block_size, D]; a sequence's
history is the concatenation of the blocks its block table lists. Heads before positions, so that one
head of one block is a contiguous [block_size, D] matrix that matmuls can read in place. New tokens are
written through a slot mapping (flat position block_id * block_size + offset).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llminfer.layers.attention import Attention, AttentionBackend, AttentionMetadata, visibility_mask

KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's dtype


class Int8Blocks:
    """One layer's keys (or values) as int8 with one float32 scale per (block, head, position): each token's
    head vector is quantized symmetrically when written, and the blocks attention reads are dequantized to the
    compute dtype. Indexing it like the float pool tensor returns dequantized blocks."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device) -> None:
        self.data = torch.zeros(shape, dtype=torch.int8, device=device)  # [num_blocks, Hkv, block_size, D]
        self.scales = torch.zeros((*shape[:-1], 1), dtype=torch.float32, device=device)
        self.dtype = dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return (self.data[index].float() * self.scales[index]).to(self.dtype)

    @staticmethod
    def quantize(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., D] -> (int8 [..., D], scale [..., 1]): absmax per head vector."""
        values = values.float()
        scale = (values.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-8)
        return torch.round(values / scale).clamp(-127, 127).to(torch.int8), scale

    def round_trip(self, values: torch.Tensor) -> torch.Tensor:
        """What reading `values` back from this cache gives: attention over fresh keys/values must see the same
        numbers as attention over cached ones."""
        q, scale = self.quantize(values)
        return (q.float() * scale).to(values.dtype)

    def write(self, blocks: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor) -> None:
        q, scale = self.quantize(values)
        self.data[blocks, :, offsets] = q
        self.scales[blocks, :, offsets] = scale

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.data[dst] = self.data[src]
        self.scales[dst] = self.scales[src]


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device, kv_cache_dtype: str = "auto") -> None:
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.quantized = kv_cache_dtype == "int8"
        if self.quantized:
            self.keys = [Int8Blocks(shape, dtype, device) for _ in range(num_layers)]
            self.values = [Int8Blocks(shape, dtype, device) for _ in range(num_layers)]
        else:
            # Zeroed, not empty: masked-out positions still pass through the value matmul (0 * NaN = NaN).
            self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                        kv_cache_dtype: str = "auto") -> int:
        per_vector = head_dim + 4 if kv_cache_dtype == "int8" else head_dim * torch.finfo(dtype).bits // 8
        return 2 * num_layers * block_size * num_kv_heads * per_vector

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write of shared partial blocks, before the step writes into the copies."""
        if not copies:
            return
        device = self.keys[0].device
        src = torch.tensor([s for s, _ in copies], device=device)
        dst = torch.tensor([d for _, d in copies], device=device)
        for cache in (*self.keys, *self.values):
            if isinstance(cache, Int8Blocks):
                cache.copy(dst, src)
            else:
                cache[dst] = cache[src]


def write_slots(cache: torch.Tensor | Int8Blocks, blocks: torch.Tensor, offsets: torch.Tensor,
                values: torch.Tensor) -> None:
    """Store values [T, Hkv, D] at (block, offset) pairs (flat slot = block * block_size + offset)."""
    if isinstance(cache, Int8Blocks):
        cache.write(blocks, offsets, values)
    else:
        cache[blocks, :, offsets] = values


def gather_history(cache: torch.Tensor | Int8Blocks, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached positions of one sequence: [Hkv, length, D] (a copy, dequantized)."""
    blocks = -(-length // cache.shape[2])
    return cache[block_table[:blocks]].transpose(0, 1).flatten(1, 2)[:, :length]


@dataclass
class StepPlan:
    slot_blocks: torch.Tensor  # [T] where each new token's key/value goes
    slot_offsets: torch.Tensor
    decodes: list[int]  # sequences with one new token
    decode_rows: torch.Tensor  # their rows in the flattened batch
    batch: "DecodeBatch | None"
    pure_decode: bool  # every sequence decodes: the whole step is one paged-attention call


@dataclass
class DecodeBatch:
    """What every layer's decode attention needs to know about the step's single-token sequences.
    Built once per step; the layers only differ in their caches."""

    block_tables: torch.Tensor  # [B, nb] blocks in use (nb covers the longest sequence)
    context_lens: list[int]
    positions: torch.Tensor  # [B] each query's own position
    num_shared: int  # leading columns naming the same full block for every sequence
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, block_tables: torch.Tensor, context_lens: list[int], block_size: int) -> "DecodeBatch":
        used = block_tables[:, : -(-max(context_lens) // block_size)]
        shared = 0
        if used.shape[0] > 1:
            same = (used == used[:1]).all(dim=0)[: min(context_lens) // block_size]
            shared = int(same.cumprod(0).sum()) if same.numel() else 0
        positions = torch.tensor(context_lens, device=block_tables.device) - 1
        return cls(used, context_lens, positions, shared)

    def visible(self, num_positions: int, sliding_window: int | None) -> torch.Tensor:
        """[B, L] which cached positions each query may attend to (memoized per window)."""
        if sliding_window not in self._masks:
            self._masks[sliding_window] = visibility_mask(self.positions, num_positions, sliding_window)
        return self._masks[sliding_window]


def paged_decode_attention_reference(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                     batch: DecodeBatch, scale: float, sliding_window: int | None = None
                                     ) -> torch.Tensor:
    """Plain per-sequence attention for one query each: q [B, Hq, D] -> [B, Hq, D]. The readable version."""
    out = torch.empty_like(q)
    for i, length in enumerate(batch.context_lens):
        keys = gather_history(key_cache, batch.block_tables[i], length).float()  # [Hkv, L, D]
        values = gather_history(value_cache, batch.block_tables[i], length).float()
        group = q.shape[1] // keys.shape[0]
        keys, values = keys.repeat_interleave(group, dim=0), values.repeat_interleave(group, dim=0)  # [Hq, L, D]
        scores = torch.einsum("hd,hld->hl", q[i].float(), keys) * scale  # [Hq, L]
        if sliding_window is not None:
            scores[:, : max(0, length - sliding_window)] = float("-inf")
        out[i] = torch.einsum("hl,hld->hd", scores.softmax(dim=-1), values).to(q.dtype)
    return out


def paged_decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           batch: DecodeBatch, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """One query per sequence over block tables of unequal lengths, batched: q [B, Hq, D] -> [B, Hq, D].

    Leading blocks that every sequence shares (a common system prompt) are read in place, once, for the
    whole batch. The other blocks in use are gathered once ([B, nb, Hkv, bs, D]; nothing else of the
    history is copied) and attended block by block: scores per (sequence, block, KV head) are a
    [G, D] x [D, bs] matmul, softmax runs over all positions of a sequence, and the weighted values are
    summed over blocks.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    shared, num_blocks = batch.num_shared, batch.block_tables.shape[1]
    # CPUs without bfloat16 arithmetic run batched bf16 matmuls as a loop of small ones (3x slower here): the
    # few blocks read per step are cheap to widen to float32.
    work = torch.float32 if q.device.type == "cpu" else q.dtype
    if num_seqs == 1:
        return _single_sequence_decode(q, key_cache, value_cache, batch, scale, sliding_window, work)
    grouped = q.view(num_seqs, num_kv_heads, group, head_dim).to(work)

    # Each sequence's own blocks.
    own = batch.block_tables[:, shared:]
    keys, values = key_cache[own].to(work), value_cache[own].to(work)  # [B, no, Hkv, bs, D]
    own_scores = torch.matmul(grouped.unsqueeze(1), keys.transpose(-1, -2))  # [B, no, Hkv, G, bs]
    scores = own_scores.permute(0, 2, 3, 1, 4).flatten(3, 4)  # [B, Hkv, G, no*bs]

    if shared:  # blocks every sequence shares: [Hkv, B*G, D] x [Hkv, D, S] in one matmul, read once
        shared_ids = batch.block_tables[0, :shared]
        shared_keys = key_cache[shared_ids].to(work).transpose(0, 1).flatten(1, 2)  # [Hkv, S, D]
        shared_values = value_cache[shared_ids].to(work).transpose(0, 1).flatten(1, 2)
        q_by_head = grouped.permute(1, 0, 2, 3).reshape(num_kv_heads, num_seqs * group, head_dim)
        shared_scores = torch.matmul(q_by_head, shared_keys.transpose(1, 2)).view(num_kv_heads, num_seqs, group, -1)
        scores = torch.cat([shared_scores.permute(1, 0, 2, 3), scores], dim=-1)  # [B, Hkv, G, L]

    visible = batch.visible(scores.shape[-1], sliding_window)  # [B, L]
    probs = (scores.float() * scale).masked_fill(~visible[:, None, None, :], float("-inf")).softmax(dim=-1)
    probs = probs.to(values.dtype)
    split = shared * block_size
    own_probs = probs[..., split:].unflatten(-1, (num_blocks - shared, block_size)).permute(0, 3, 1, 2, 4)
    out = torch.matmul(own_probs, values).sum(dim=1)  # [B, Hkv, G, D]
    if shared:
        shared_probs = probs[..., :split].permute(1, 0, 2, 3).reshape(num_kv_heads, num_seqs * group, split)
        out = out + torch.matmul(shared_probs, shared_values).view(num_kv_heads, num_seqs, group,
                                                                   head_dim).permute(1, 0, 2, 3)
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def _single_sequence_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            batch: DecodeBatch, scale: float, sliding_window: int | None,
                            work: torch.dtype) -> torch.Tensor:
    """Batch of one (interactive decoding): its history gathered once, two grouped matmuls. Half the ops of
    the batched path, which matters when a step is a few hundred microseconds per layer."""
    length = batch.context_lens[0]
    first = max(0, length - sliding_window) if sliding_window is not None else 0
    keys = gather_history(key_cache, batch.block_tables[0], length)[:, first:].to(work)  # [Hkv, L, D]
    values = gather_history(value_cache, batch.block_tables[0], length)[:, first:].to(work)
    num_kv_heads = keys.shape[0]
    grouped = q[0].view(num_kv_heads, -1, q.shape[-1]).to(work)  # [Hkv, G, D]
    probs = (torch.bmm(grouped, keys.transpose(1, 2)).float() * scale).softmax(dim=-1).to(work)
    return torch.bmm(probs, values).reshape(q.shape).to(q.dtype)


class PagedAttentionBackend(AttentionBackend):
    """Prefill chunks: SDPA per sequence over its cached prefix plus the chunk (flash kernel, causal when
    the chunk is the whole sequence). Single-token decodes: one batched paged-attention call."""

    def __init__(self, cache: PagedKVCache, reference: bool = False) -> None:
        self.cache = cache
        self.decode_attention = paged_decode_attention_reference if reference else paged_decode_attention
        self._step: tuple[AttentionMetadata, StepPlan] | None = None

    def _plan(self, metadata: AttentionMetadata, device: torch.device) -> "StepPlan":
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

    def forward(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        keys, values = self.cache.keys[layer.layer_idx], self.cache.values[layer.layer_idx]
        plan = self._plan(metadata, q.device)
        write_slots(keys, plan.slot_blocks, plan.slot_offsets, k)
        write_slots(values, plan.slot_blocks, plan.slot_offsets, v)
        if plan.pure_decode:
            return self.decode_attention(q, keys, values, plan.batch, layer.scale, layer.sliding_window)
        starts, query_lens = metadata.query_start_loc, metadata.query_lens
        decodes, rows, batch = plan.decodes, plan.decode_rows, plan.batch
        out = torch.empty_like(q)
        if decodes:
            out[rows] = self.decode_attention(q[rows], keys, values, batch, layer.scale, layer.sliding_window)
        for i, q_len in enumerate(query_lens):
            if q_len > 1:
                rows = slice(starts[i], starts[i + 1])
                if q_len == metadata.context_lens[i]:  # a whole prompt: its history is exactly this chunk
                    history_k, history_v = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
                    if self.cache.quantized:  # see what a later read of the cache would see
                        history_k, history_v = keys.round_trip(history_k), values.round_trip(history_v)
                else:
                    history_k = gather_history(keys, metadata.block_tables[i], metadata.context_lens[i])
                    history_v = gather_history(values, metadata.block_tables[i], metadata.context_lens[i])
                out[rows] = self._prefill(layer, q[rows], history_k, history_v)
        return out

    def _prefill(self, layer: Attention, q: torch.Tensor, ki: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
        """q: [q_len, Hq, D] of the last q_len positions; ki/vi: [Hkv, L, D] the whole history."""
        q_len, length = q.shape[0], ki.shape[1]
        qi = q.transpose(0, 1)  # [Hq, q_len, D]
        window_matters = layer.sliding_window is not None and length > layer.sliding_window
        if q_len == length and not window_matters:
            out = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=layer.scale, enable_gqa=True)
        else:  # a chunk after a cached prefix: query i sits at position length - q_len + i
            positions = torch.arange(length - q_len, length, device=q.device)
            mask = visibility_mask(positions, length, layer.sliding_window)
            out = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=layer.scale, enable_gqa=True)
        return out.transpose(0, 1)
