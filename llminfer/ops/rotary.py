"""Rotary position embedding (Su et al., 2021) in the rotate-half layout of Hugging Face checkpoints."""

from __future__ import annotations

import torch

from llminfer.ops import cpu_kernels
from llminfer.ops.registry import define_op, implement

define_op("rotary_embedding", "rotary_embedding(positions [T], x [T, H, D], cos [P, D/2], sin [P, D/2]) -> "
                              "[T, H, D]: each head vector rotated by its token's position",
          fake=lambda positions, x, cos, sin: torch.empty_like(x))


@implement("rotary_embedding", "reference", capturable=True)
def rotary_embedding_reference(positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor,
                               sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [T, 1, D/2]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


@implement("rotary_embedding", "cpu", devices=("cpu",), priority=10,
           requirement=cpu_kernels.build_requirement, capturable=True)
def rotary_embedding_cpu(positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> torch.Tensor:
    if x.dim() != 3 or not cpu_kernels.takes(x) or x.stride(-1) != 1 or x.stride(1) != x.shape[2]:
        return rotary_embedding_reference(positions, x, cos, sin)
    return cpu_kernels.kernels().rotary_embedding(positions, x, cos, sin)
