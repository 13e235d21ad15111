"""The attention layer and the interface to the backend that owns the KV cache.

The layer knows heads, scale and window; it never touches the cache. Each forward pass the model
runner hands in a `ForwardContext`: the backend (which owns the KV cache and calls the attention ops)
and the batch's `AttentionMetadata`. Backends: the engine's paged one (llminfer.kv_cache) and a dense one
here for whole-sequence passes without a cache. Another cache layout or kernel family means a new backend, not a
new model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from llminfer.ops import OpSet


@dataclass
class AttentionMetadata:
    """Where each sequence of a flattened batch sits, in the batch and in the cache."""

    query_start_loc: list[int]  # sequence i's new tokens are rows [query_start_loc[i], query_start_loc[i+1])
    context_lens: list[int]  # tokens of sequence i held in the cache after this step
    slot_mapping: torch.Tensor  # [T] where each new token's key/value is stored (flat cache position)
    block_tables: torch.Tensor  # [B, max_blocks] cache blocks of each sequence, in order (padded with 0)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def query_lens(self) -> list[int]:
        return [b - a for a, b in zip(self.query_start_loc, self.query_start_loc[1:])]


class AttentionBackend(ABC):
    """Stores this step's keys/values in its cache and attends over everything cached."""

    @abstractmethod
    def forward(self, layer: "Attention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]."""


class DenseAttentionBackend(AttentionBackend):
    """No cache: each sequence of the flattened batch attends causally over its own tokens of this pass.
    For whole-sequence passes outside the engine (calibration statistics)."""

    def __init__(self, ops: "OpSet") -> None:
        self.ops = ops

    def forward(self, layer: "Attention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        starts = metadata.query_start_loc
        for start, end in zip(starts, starts[1:]):
            rows = slice(start, end)
            out[rows] = self.ops.prefill_attention(q[rows], k[rows].transpose(0, 1), v[rows].transpose(0, 1),
                                                   layer.scale, layer.sliding_window)
        return out

    @staticmethod
    def context(ops: "OpSet", sequence_lengths: list[int], device: torch.device) -> "ForwardContext":
        starts = [0]
        for length in sequence_lengths:
            starts.append(starts[-1] + length)
        empty = torch.empty(0, dtype=torch.long, device=device)
        return ForwardContext(DenseAttentionBackend(ops), AttentionMetadata(starts, list(sequence_lengths), empty,
                                                                             empty))


@dataclass
class ForwardContext:
    backend: AttentionBackend
    metadata: AttentionMetadata


class Attention(nn.Module):
    """Scaled dot-product attention with grouped KV heads, delegated to the context's backend."""

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None = None, scale: float | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        out = ctx.backend.forward(self, q, k, v, ctx.metadata)  # [T, Hq, D]
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)

