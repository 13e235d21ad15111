"""RMSNorm (Zhang & Sennrich, 2019), alone and fused with the residual add that precedes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llminfer.ops.registry import define_op, implement

define_op("rms_norm", "rms_norm(x [T, H], weight [H], eps) -> [T, H]: x / rms(x) * weight, computed in float32",
          fake=lambda x, weight, eps: torch.empty_like(x))
define_op("add_rms_norm", "add_rms_norm(x [T, H], residual [T, H], weight [H], eps) -> (rms_norm(x + residual), "
                          "x + residual)",
          fake=lambda x, residual, weight, eps: (torch.empty_like(x), torch.empty_like(x)))


@implement("rms_norm", "reference")
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)  # one fused kernel, in float32 like HF
    return weight * normed.to(x.dtype)


@implement("add_rms_norm", "reference")
def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x + residual
    return rms_norm_reference(summed, weight, eps), summed
