"""What a layer needs to know to run as one tensor-parallel rank's share (Megatron-style), and nothing more.

A layer built by the LayerFactory for a parallel run carries a `Parallel`: its role, the rows or columns of
the full checkpoint tensor this rank holds, and the collectives that combine the ranks' results. The
collectives are passed in (llminfer.parallel provides torch.distributed's); this module never imports them.

Roles:
  column  output rows split (q|k|v, gate|up): no communication, each rank computes its own outputs
  row     input columns split (o_proj, down_proj): partial products all-reduced, the bias added once
  vocab   vocabulary rows split (embedding, LM head): embeddings all-reduced, logits gathered
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class Collectives(Protocol):
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """In place over all ranks; op 'sum' or 'max'."""

    def all_gather_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor, concatenated along the last dimension in rank order."""


class TensorParallelPlan(Protocol):
    """Which share of each dimension this rank holds (llminfer.parallel.sharding.ShardPlan)."""

    rank: int
    world_size: int

    def full_width(self, split_by: str) -> int:
        """The unsplit size of a dimension: 'heads', 'kv_heads' (times head_dim), 'intermediate', 'vocab'."""

    def share(self, split_by: str) -> tuple[int, int]:
        """(start, length) of this rank's part of that dimension."""


@dataclass(frozen=True)
class TensorSplit:
    """Rank r of n holds the concatenation of tensor.narrow(axis, start, length) for each range;
    axis None = replicated. Fused projections (q|k|v, gate|up) take one range per part."""

    axis: int | None
    ranges: tuple[tuple[int, int], ...] = ()

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return tensor
        parts = [tensor.narrow(self.axis, start, length) for start, length in self.ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.axis)

    def scaled(self, step: int) -> "TensorSplit":
        """The same split of a tensor holding one entry per `step` of the axis (int4 bytes, quantization groups)."""
        return TensorSplit(self.axis, tuple((start // step, length // step) for start, length in self.ranges))


REPLICATED = TensorSplit(None)


@dataclass(frozen=True)
class Parallel:
    role: str  # "column" | "row" | "vocab"
    ranges: tuple[tuple[int, int], ...]  # column/vocab: this rank's output rows; row: its input columns
    collectives: Collectives
    part_ranges: tuple[tuple[int, int], ...] = ()  # a fused projection: the rows of each part in the part alone

    def rows(self, shard: str | int | None = None, parts: tuple | None = None) -> TensorSplit:
        """This rank's output rows: of one part of a fused projection stored apart (q_proj of qkv_proj), or of
        the whole tensor (shard None: a projection stored fused, each part's rows after the parts before it)."""
        if shard is None or parts is None:
            return TensorSplit(0, self.ranges)
        return TensorSplit(0, (self.part_ranges[parts.index(shard)],))

    def columns(self) -> TensorSplit:
        return TensorSplit(1, self.ranges)


class ParallelOutput:
    """Mixed into every linear layer: what happens to its product before it is returned (the bias last)."""

    parallel: Parallel | None = None
    bias: torch.Tensor | None

    @property
    def bias_in_product(self) -> torch.Tensor | None:
        """The bias the matmul may add itself: not a row-parallel layer's, which is added once after the sum."""
        return self.bias if self.parallel is None or self.parallel.role != "row" else None

    def combine(self, y: torch.Tensor, bias_added: bool) -> torch.Tensor:
        parallel = self.parallel
        if parallel is not None and parallel.role == "row":
            parallel.collectives.all_reduce(y)
        if self.bias is not None and not bias_added:
            y = y + self.bias
        if parallel is not None and parallel.role == "vocab":  # the LM head: every rank's vocabulary slice
            y = parallel.collectives.all_gather_last(y.contiguous())
        return y

    def reduced_row_max(self, absmax: torch.Tensor) -> torch.Tensor:
        """A row-parallel rank sees part of each input row; dynamic quantization needs the whole row's maximum."""
        if self.parallel is not None and self.parallel.role == "row":
            self.parallel.collectives.all_reduce(absmax, "max")
        return absmax
