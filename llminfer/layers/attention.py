"""The attention layer and the interface to the backend that owns the KV cache.

The layer knows heads, scale and window; it never touches the cache. Each forward pass the model
runner hands in a `ForwardContext`: the backend (which owns the KV cache and calls the attention ops)
and the batch's `AttentionMetadata`. Another cache layout or kernel family means a new backend, not a
new model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn


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

