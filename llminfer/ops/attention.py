"""Attention over the paged KV cache: storing a step's keys/values, one-query decode over block tables, and
prefill of a chunk over its whole history.

Cache layout (owned by kv_cache.PagedKVCache): per layer, keys and values [num_blocks, Hkv, block_size, D];
heads before positions, so one head of one block is a contiguous [block_size, D] matrix. An int8 cache stores
int8 values with a float32 scale per (block, head, position) [num_blocks, Hkv, block_size, 1]; the scales
are None for a float cache. Flat slot = block_id * block_size + offset.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from llminfer.ops import cpu_kernels
from llminfer.ops.registry import define_op, implement

define_op("write_kv", "write_kv(key_cache, value_cache, key_scales | None, value_scales | None, slot_blocks [T], "
                      "slot_offsets [T], k [T, Hkv, D], v [T, Hkv, D]): store each new token's key/value in its "
                      "slot (quantized per head vector for an int8 cache)",
          mutates=("key_cache", "value_cache", "key_scales", "value_scales"))
define_op("paged_decode_attention",
          "paged_decode_attention(q [B, Hq, D], key_cache, value_cache, key_scales | None, value_scales | None, "
          "block_tables [B, nb], context_lens int64 [B], num_shared, scale, sliding_window | None) -> [B, Hq, D]: "
          "one query per sequence over its cached blocks, read in place; num_shared leading blocks are the same "
          "for every sequence",
          fake=lambda q, *args: torch.empty_like(q))
define_op("prefill_attention",
          "prefill_attention(q [Q, Hq, D], k [Hkv, L, D], v [Hkv, L, D], scale, sliding_window | None) -> "
          "[Q, Hq, D]: causal attention of the last Q positions over the whole history (GQA)",
          fake=lambda q, k, v, scale, sliding_window: torch.empty_like(q))


# --- helpers shared by the implementations (and the cache) -----------------------------------------

def quantize_kv(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] -> (int8 [..., D], float32 scale [..., 1]): symmetric absmax per head vector."""
    values = values.float()
    scale = (values.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-8)
    return torch.round(values / scale).clamp(-127, 127).to(torch.int8), scale


def read_blocks(cache: torch.Tensor, scales: Optional[torch.Tensor], index: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """cache[index] in the compute dtype (dequantized for an int8 cache)."""
    if scales is None:
        return cache[index]
    return (cache[index].float() * scales[index]).to(dtype)


def gather_history(cache: torch.Tensor, scales: Optional[torch.Tensor], block_table: torch.Tensor, length: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """The first `length` cached positions of one sequence: [Hkv, length, D] (a copy, dequantized)."""
    blocks = -(-length // cache.shape[2])
    return read_blocks(cache, scales, block_table[:blocks], dtype).transpose(0, 1).flatten(1, 2)[:, :length]


def visibility_mask(query_positions: torch.Tensor, num_keys: int, sliding_window: int | None) -> torch.Tensor:
    """[Q, K] bool: key j is visible to a query at absolute position p iff j <= p (and p - j < window)."""
    keys = torch.arange(num_keys, device=query_positions.device)
    offset = query_positions[:, None] - keys[None, :]
    visible = offset >= 0
    if sliding_window is not None:
        visible &= offset < sliding_window
    return visible


# --- write_kv --------------------------------------------------------------------------------------

@implement("write_kv", "reference", capturable=True)
def write_kv_reference(key_cache: torch.Tensor, value_cache: torch.Tensor, key_scales: Optional[torch.Tensor],
                       value_scales: Optional[torch.Tensor], slot_blocks: torch.Tensor, slot_offsets: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor) -> None:
    for cache, scales, new in ((key_cache, key_scales, k), (value_cache, value_scales, v)):
        if scales is None:
            cache[slot_blocks, :, slot_offsets] = new
        else:
            q, scale = quantize_kv(new)
            cache[slot_blocks, :, slot_offsets] = q
            scales[slot_blocks, :, slot_offsets] = scale


@implement("write_kv", "cpu", devices=("cpu",), priority=10,
           requirement=cpu_kernels.build_requirement, capturable=True)
def write_kv_cpu(key_cache: torch.Tensor, value_cache: torch.Tensor, key_scales: Optional[torch.Tensor],
                 value_scales: Optional[torch.Tensor], slot_blocks: torch.Tensor, slot_offsets: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor) -> None:
    """Each head vector copied (or quantized) straight into its slot, both caches in one call."""
    if not cpu_kernels.takes(k, v) or (key_scales is None and key_cache.dtype != k.dtype):
        return write_kv_reference(key_cache, value_cache, key_scales, value_scales, slot_blocks, slot_offsets, k, v)
    cpu_kernels.kernels().write_kv(key_cache, value_cache, key_scales, value_scales, slot_blocks, slot_offsets, k, v)


# --- paged_decode_attention ------------------------------------------------------------------------

@implement("paged_decode_attention", "reference")
def paged_decode_attention_reference(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                     key_scales: Optional[torch.Tensor], value_scales: Optional[torch.Tensor],
                                     block_tables: torch.Tensor, context_lens: torch.Tensor, num_shared: int,
                                     scale: float, sliding_window: Optional[int]) -> torch.Tensor:
    """Plain per-sequence attention, one sequence at a time: the readable version."""
    out = torch.empty_like(q)
    for i, length in enumerate(context_lens.tolist()):
        keys = gather_history(key_cache, key_scales, block_tables[i], length, q.dtype).float()  # [Hkv, L, D]
        values = gather_history(value_cache, value_scales, block_tables[i], length, q.dtype).float()
        group = q.shape[1] // keys.shape[0]
        keys, values = keys.repeat_interleave(group, dim=0), values.repeat_interleave(group, dim=0)  # [Hq, L, D]
        scores = torch.einsum("hd,hld->hl", q[i].float(), keys) * scale  # [Hq, L]
        if sliding_window is not None:
            scores[:, : max(0, length - sliding_window)] = float("-inf")
        out[i] = torch.einsum("hl,hld->hd", scores.softmax(dim=-1), values).to(q.dtype)
    return out


@implement("paged_decode_attention", "batched", priority=10)
def paged_decode_attention_batched(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                   key_scales: Optional[torch.Tensor], value_scales: Optional[torch.Tensor],
                                   block_tables: torch.Tensor, context_lens: torch.Tensor, num_shared: int,
                                   scale: float, sliding_window: Optional[int]) -> torch.Tensor:
    """The whole batch in a few matmuls.

    Leading blocks that every sequence shares (a common system prompt) are read in place, once, for the
    whole batch. The other blocks in use are gathered once ([B, nb, Hkv, bs, D]; nothing else of the
    history is copied) and attended block by block: scores per (sequence, block, KV head) are a
    [G, D] x [D, bs] matmul, softmax runs over all positions of a sequence, and the weighted values are
    summed over blocks.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    shared, num_blocks = num_shared, block_tables.shape[1]
    # CPUs without bfloat16 arithmetic run batched bf16 matmuls as a loop of small ones (3x slower here): the
    # few blocks read per step are cheap to widen to float32.
    work = torch.float32 if q.device.type == "cpu" else q.dtype
    if num_seqs == 1:
        return _single_sequence_decode(q, key_cache, value_cache, key_scales, value_scales, block_tables,
                                       int(context_lens[0]), scale, sliding_window, work)
    grouped = q.view(num_seqs, num_kv_heads, group, head_dim).to(work)

    # Each sequence's own blocks.
    own = block_tables[:, shared:]
    keys = read_blocks(key_cache, key_scales, own, q.dtype).to(work)  # [B, no, Hkv, bs, D]
    values = read_blocks(value_cache, value_scales, own, q.dtype).to(work)
    own_scores = torch.matmul(grouped.unsqueeze(1), keys.transpose(-1, -2))  # [B, no, Hkv, G, bs]
    scores = own_scores.permute(0, 2, 3, 1, 4).flatten(3, 4)  # [B, Hkv, G, no*bs]

    if shared:  # blocks every sequence shares: [Hkv, B*G, D] x [Hkv, D, S] in one matmul, read once
        shared_ids = block_tables[0, :shared]
        shared_keys = read_blocks(key_cache, key_scales, shared_ids, q.dtype).to(work).transpose(0, 1).flatten(1, 2)
        shared_values = read_blocks(value_cache, value_scales, shared_ids, q.dtype).to(work).transpose(0, 1) \
            .flatten(1, 2)  # [Hkv, S, D]
        q_by_head = grouped.permute(1, 0, 2, 3).reshape(num_kv_heads, num_seqs * group, head_dim)
        shared_scores = torch.matmul(q_by_head, shared_keys.transpose(1, 2)).view(num_kv_heads, num_seqs, group, -1)
        scores = torch.cat([shared_scores.permute(1, 0, 2, 3), scores], dim=-1)  # [B, Hkv, G, L]

    positions = context_lens.to(q.device) - 1
    visible = visibility_mask(positions, scores.shape[-1], sliding_window)  # [B, L]
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


@implement("paged_decode_attention", "cpu", devices=("cpu",), priority=20,
           requirement=cpu_kernels.build_requirement, capturable=True)
def paged_decode_attention_cpu(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               key_scales: Optional[torch.Tensor], value_scales: Optional[torch.Tensor],
                               block_tables: torch.Tensor, context_lens: torch.Tensor, num_shared: int,
                               scale: float, sliding_window: Optional[int]) -> torch.Tensor:
    """One task per (sequence, KV head), reading its blocks in place through the block table (an int8 cache is
    dequantized as it is read), in float32: with AVX-512, one pass of 16 positions at a time with an online
    softmax for all the head's query heads; with AVX2, all scores, softmax, then the weighted values. Shared
    blocks are read by each sequence (from cache, after the first)."""
    if not cpu_kernels.takes(q) or (key_scales is None and key_cache.dtype != q.dtype):
        return paged_decode_attention_batched(q, key_cache, value_cache, key_scales, value_scales, block_tables,
                                              context_lens, num_shared, scale, sliding_window)
    return cpu_kernels.kernels().paged_decode_attention(q, key_cache, value_cache, key_scales, value_scales,
                                                        block_tables, context_lens, scale, sliding_window,
                                                        cpu_kernels.float_isa())


def _single_sequence_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            key_scales: Optional[torch.Tensor], value_scales: Optional[torch.Tensor],
                            block_tables: torch.Tensor, length: int, scale: float, sliding_window: int | None,
                            work: torch.dtype) -> torch.Tensor:
    """Batch of one (interactive decoding): its history gathered once, two grouped matmuls. Half the ops of
    the batched path, which matters when a step is a few hundred microseconds per layer."""
    first = max(0, length - sliding_window) if sliding_window is not None else 0
    keys = gather_history(key_cache, key_scales, block_tables[0], length, q.dtype)[:, first:].to(work)  # [Hkv, L, D]
    values = gather_history(value_cache, value_scales, block_tables[0], length, q.dtype)[:, first:].to(work)
    num_kv_heads = keys.shape[0]
    grouped = q[0].view(num_kv_heads, -1, q.shape[-1]).to(work)  # [Hkv, G, D]
    probs = (torch.bmm(grouped, keys.transpose(1, 2)).float() * scale).softmax(dim=-1).to(work)
    return torch.bmm(probs, values).reshape(q.shape).to(q.dtype)


# --- prefill_attention -----------------------------------------------------------------------------

@implement("prefill_attention", "sdpa")
def prefill_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           sliding_window: Optional[int]) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention on one sequence.

    Called with a batch dimension of one: on 3-D inputs PyTorch's CPU dispatch takes the math path
    (scores materialized, 4-5x slower at 1024 tokens); on 4-D inputs it takes the flash kernel,
    with or without a mask.
    """
    q_len, length = q.shape[0], k.shape[1]
    qi, kb, vb = q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)  # [1, H, L, D]
    window_matters = sliding_window is not None and length > sliding_window
    if q_len == length and not window_matters:
        out = F.scaled_dot_product_attention(qi, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
    else:  # a chunk after a cached prefix: query i sits at position length - q_len + i
        positions = torch.arange(length - q_len, length, device=q.device)
        mask = visibility_mask(positions, length, sliding_window)
        out = F.scaled_dot_product_attention(qi, kb, vb, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)
