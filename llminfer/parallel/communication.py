"""torch.distributed's collectives as the parallel layers use them (llminfer.layers.parallel.Collectives), timed.

Gloo on CPU, NCCL on CUDA: whichever process group the launcher started.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class CommunicationClock:
    """Wall time this process spends inside collectives (waiting for slower ranks included)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def run(self, collective, *args) -> None:
        start = time.perf_counter()
        collective(*args)
        self.seconds += time.perf_counter() - start


communication = CommunicationClock()


class TorchCollectives:
    """All-reduce and all-gather over the default process group, on the clock."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        communication.run(dist.all_reduce, tensor, _REDUCE_OPS[op])

    def all_gather_last(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        communication.run(dist.all_gather, parts, tensor)
        return torch.cat(parts, dim=-1)
