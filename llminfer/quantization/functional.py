"""Quantize / dequantize functions and the plain reference matmuls the fast kernels are tested against.

Conventions (shared by the layers, the checkpoint format and the tests):
- int8 weights, per output channel, symmetric:      w ~= q * scale,            q in [-127, 127]
- int4 weights, per group of `group_size` inputs:   w ~= (q - zero) * scale,   q in [0, 15],
  asymmetric with a float zero point, so each group's minimum and maximum are represented exactly
  (the grid of llama.cpp's Q4_1 and of PyTorch's int4 kernels).
- int8 activations, per token, symmetric:           x ~= q * scale             (A8W8, computed at run time)
"""

from __future__ import annotations

import torch

INT4_LEVELS = 15  # q in [0, 15]
INT8_MAX = 127  # symmetric: -128 is never produced, so -q is always representable


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q int8 [N, K], scale float32 [N])."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8_per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def check_group_size(in_features: int, group_size: int, name: str = "layer") -> None:
    from llminfer.errors import ConfigError

    if group_size not in (32, 64, 128):
        raise ConfigError(f"group size {group_size} is not supported (expected 32, 64 or 128)")
    if in_features % group_size:
        raise ConfigError(f"{name}: group size {group_size} does not divide the input dimension {in_features} "
                          f"(choose a group size that divides it)")


def int4_group_params(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid of each group: weight [N, K] -> (scale [N, K/g], zero [N, K/g]), both float32."""
    groups = weight.float().reshape(weight.shape[0], -1, group_size)
    low = groups.amin(dim=-1)
    high = groups.amax(dim=-1)
    scale = ((high - low) / INT4_LEVELS).clamp(min=1e-8)
    zero = -low / scale  # the (fractional) level that represents 0.0; level 0 is the group minimum
    return scale, zero


def quantize_int4_with(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Levels q in [0, 15] (uint8 [N, K]) of weight on a given group grid."""
    n, k = weight.shape
    group_size = k // scale.shape[1]
    groups = weight.float().reshape(n, -1, group_size)
    q = torch.round(groups / scale[..., None] + zero[..., None]).clamp(0, INT4_LEVELS)
    return q.reshape(n, k).to(torch.uint8)


def quantize_int4_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q uint8 levels [N, K], scale [N, K/g], zero [N, K/g]) by round-to-nearest."""
    scale, zero = int4_group_params(weight, group_size)
    return quantize_int4_with(weight, scale, zero), scale, zero


def dequantize_int4_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    group_size = k // scale.shape[1]
    groups = q.float().reshape(n, -1, group_size)
    return ((groups - zero.float()[..., None]) * scale.float()[..., None]).reshape(n, k)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Levels uint8 [N, K] (K even) -> two per byte [N, K/2]: even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def quantize_int8_per_token(x: torch.Tensor, absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (q int8 [M, K], scale float32 [M, 1]). `absmax` [M, 1]: each row's largest
    magnitude when x is only a slice of the row (tensor parallelism); by default x's own."""
    x = x.float()
    absmax = x.abs().amax(dim=-1, keepdim=True) if absmax is None else absmax
    scale = (absmax / INT8_MAX).clamp(min=1e-12)
    return torch.round(x / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


# --- reference matmuls (float64, no special kernels): what each quantized layer must equal -----------

def reference_a16w8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.double() @ (q.double() * scale.double()[:, None]).T).to(x.dtype)


def reference_a16w4(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (x.double() @ dequantize_int4_groups(q, scale, zero).double().T).to(x.dtype)


def reference_a8w8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                   smooth: torch.Tensor | None = None) -> torch.Tensor:
    """x is divided by the smoothing factors, quantized per token, multiplied in integers, rescaled."""
    xs = x.double() / smooth.double() if smooth is not None else x.double()
    xq, x_scale = quantize_int8_per_token(xs)
    acc = xq.double() @ q.double().T  # exact: integers well below 2^53
    return (acc * x_scale.double() * scale.double()[None, :]).to(x.dtype)
