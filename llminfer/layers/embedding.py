"""One tensor-parallel rank's slice of the token embeddings (one process uses torch's nn.Embedding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llminfer.layers.parallel import Parallel, TensorSplit


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the embedding; the other ranks contribute the rest through an all-reduce."""

    def __init__(self, rows: int, hidden_size: int, parallel: Parallel) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden_size), requires_grad=False)
        self.parallel = parallel
        self.start, self.rows = parallel.ranges[0][0], rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        mine = (local >= 0) & (local < self.rows)
        out = F.embedding(local.clamp(0, self.rows - 1), self.weight) * mine[:, None].to(self.weight.dtype)
        self.parallel.collectives.all_reduce(out)
        return out

    def tensor_split(self, suffix: str, shard: str | int | None = None) -> TensorSplit:
        return self.parallel.rows()
