"""Gated MLP activations over a fused gate|up projection: SwiGLU (Llama) and GeGLU with tanh GELU (Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llminfer.ops import cpu_kernels
from llminfer.ops.registry import define_op, implement


def _half_width(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


define_op("silu_and_mul", "silu_and_mul(gate_up [T, 2I]) -> [T, I]: silu(gate) * up", fake=_half_width)
define_op("gelu_tanh_and_mul", "gelu_tanh_and_mul(gate_up [T, 2I]) -> [T, I]: gelu_tanh(gate) * up",
          fake=_half_width)



@implement("silu_and_mul", "reference", capturable=True)
def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@implement("gelu_tanh_and_mul", "reference", capturable=True)
def gelu_tanh_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


@implement("silu_and_mul", "cpu", devices=("cpu",), priority=10,
           requirement=cpu_kernels.build_requirement, capturable=True)
def silu_and_mul_cpu(gate_up: torch.Tensor) -> torch.Tensor:
    if gate_up.dim() != 2 or not cpu_kernels.takes(gate_up):
        return silu_and_mul_reference(gate_up)
    return cpu_kernels.kernels().silu_and_mul(gate_up)


@implement("gelu_tanh_and_mul", "cpu", devices=("cpu",), priority=10,
           requirement=cpu_kernels.build_requirement, capturable=True)
def gelu_tanh_and_mul_cpu(gate_up: torch.Tensor) -> torch.Tensor:
    if gate_up.dim() != 2 or not cpu_kernels.takes(gate_up):
        return gelu_tanh_and_mul_reference(gate_up)
    return cpu_kernels.kernels().gelu_tanh_and_mul(gate_up)
