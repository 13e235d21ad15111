"""RMSNorm as a layer: its weight, and the op (alone, or fused with the residual add before it)."""

from __future__ import annotations

import torch
from torch import nn

from llminfer.ops import OpSet, default_ops


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019), computed in float32 like the reference.

    `forward(x)` normalizes x; `forward(x, residual)` first adds the residual and returns (normed, sum), so the
    add and the norm are one op."""

    def __init__(self, hidden_size: int, eps: float, ops: OpSet | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.ops = ops or default_ops()

    def scale(self) -> torch.Tensor:
        """What the normalized vector is multiplied by: the weight (Gemma: 1 + weight)."""
        return self.weight

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # [T, H]
        if residual is None:
            return self.ops.rms_norm(x, self.scale(), self.eps)
        return self.ops.add_rms_norm(x, residual, self.scale(), self.eps)
