"""RMSNorm (Zhang & Sennrich, 2019), alone and fused with the residual add that precedes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llminfer.ops import cpu_kernels
from llminfer.ops.registry import define_op, implement

define_op("rms_norm", "rms_norm(x [T, H], weight [H], eps) -> [T, H]: x / rms(x) * weight, computed in float32",
          fake=lambda x, weight, eps: torch.empty_like(x))
define_op("add_rms_norm", "add_rms_norm(x [T, H], residual [T, H], weight [H], eps) -> (rms_norm(x + residual), "
                          "x + residual)",
          fake=lambda x, residual, weight, eps: (torch.empty_like(x), torch.empty_like(x)))


@implement("rms_norm", "reference", capturable=True)
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)  # one fused kernel, in float32 like HF
    return weight * normed.to(x.dtype)


@implement("add_rms_norm", "reference", capturable=True)
def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x + residual
    return rms_norm_reference(summed, weight, eps), summed


@implement("rms_norm", "cpu", devices=("cpu",), priority=10,
           requirement=cpu_kernels.build_requirement, capturable=True)
def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """One pass per row (ops/csrc/decode_ops.cpp), the reference's rounding."""
    if x.dim() != 2 or not cpu_kernels.takes(x, weight):
        return rms_norm_reference(x, weight, eps)
    return cpu_kernels.kernels().rms_norm(x, weight.contiguous(), eps)


@implement("add_rms_norm", "cpu", devices=("cpu",), priority=10,
           requirement=cpu_kernels.build_requirement, capturable=True)
def add_rms_norm_cpu(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the norm in one pass per row."""
    if x.dim() != 2 or not cpu_kernels.takes(x, residual, weight):
        return add_rms_norm_reference(x, residual, weight, eps)
    return cpu_kernels.kernels().add_rms_norm(x, residual, weight.contiguous(), eps)
