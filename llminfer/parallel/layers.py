"""The layers that change under tensor parallelism; the model file does not.

Each rank builds the network of its ShardPlan.rank_config (its heads, its MLP width), then `parallelize`
swaps in what needs communication: row-parallel projections all-reduce their partial sums, the embedding
looks up only its vocabulary slice (and all-reduces), the LM head gathers the vocabulary slices of the logits.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llminfer.layers.linear import Linear
from llminfer.parallel.sharding import ShardPlan


class CommunicationClock:
    """Wall time this process spends inside collectives (waiting for slower ranks included)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def run(self, collective, *args) -> None:
        start = time.perf_counter()
        collective(*args)
        self.seconds += time.perf_counter() - start


communication = CommunicationClock()


class RowParallelLinear(Linear):
    """Input columns split across ranks: each computes a partial x_r W_r^T; the sum is all-reduced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = self.ops.linear(x, self.weight, None)
        communication.run(dist.all_reduce, partial)
        return partial + self.bias if self.bias is not None else partial


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the embedding; other ranks contribute the rest through an all-reduce."""

    def __init__(self, embedding: nn.Embedding, start: int) -> None:
        super().__init__()
        self.weight = embedding.weight
        self.start, self.rows = start, embedding.weight.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        mine = (local >= 0) & (local < self.rows)
        out = F.embedding(local.clamp(0, self.rows - 1), self.weight) * mine[:, None].to(self.weight.dtype)
        communication.run(dist.all_reduce, out)
        return out


class RowParallelQuantized:
    """Mixed into a quantized layer of a row-parallel projection: the partial products are all-reduced before
    the bias is added (once). A8W8 quantizes each token with the maximum over the whole row, as one process
    would: one more small all-reduce (a float per token)."""

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        communication.run(dist.all_reduce, y)
        return super()._add_bias(y)

    def _row_absmax(self, flat: torch.Tensor) -> torch.Tensor:
        absmax = super()._row_absmax(flat)
        communication.run(dist.all_reduce, absmax, dist.ReduceOp.MAX)
        return absmax


class GatheredLMHead:
    """Mixed into the LM head (float or quantized): logits for this rank's vocabulary slice, gathered from all
    ranks into the full vocabulary."""

    world_size: int

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = super().forward(hidden).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        communication.run(dist.all_gather, parts, local)
        return torch.cat(parts, dim=-1)


def _mix(module: nn.Module, mixin: type) -> None:
    """Give `module` the mixin's behaviour in place: same object, same parameters and loaders."""
    cls = type(module)
    module.__class__ = _MIXED.setdefault((mixin, cls), type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {}))


_MIXED: dict[tuple[type, type], type] = {}


def parallelize(model: nn.Module, plan: ShardPlan) -> None:
    """Swap the communicating layers into a network built from plan.rank_config (vocabulary sliced);
    float or quantized."""
    from llminfer.quantization.layers import QuantizedLinear

    for name, module in model.named_modules():
        if name.endswith((".o_proj", ".down_proj")):
            if type(module) is Linear:
                module.__class__ = RowParallelLinear  # same parameters and loader, forward adds the all-reduce
            elif isinstance(module, QuantizedLinear):
                _mix(module, RowParallelQuantized)
    rows = plan.config.vocab_size // plan.world_size
    model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens, plan.rank * rows)
    _mix(model.lm_head, GatheredLMHead)
    model.lm_head.world_size = plan.world_size
