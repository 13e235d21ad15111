"""The matrix product of each weight format: float, int8 per channel (A16W8), int4 groups (A16W4) and
int8 x int8 with int32 accumulation (A8W8). Activations are [M, K] rows; weights are [N, K] as in HF
checkpoints (int4 in the kernel's packed layout)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from llminfer.ops import cpu_kernels
from llminfer.ops.registry import define_op, implement


def _rows_by(x: torch.Tensor, n: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    return x.new_empty((x.shape[0], n), dtype=dtype or x.dtype)


define_op("linear", "linear(x [M, K], weight [N, K], bias [N] | None) -> [M, N]",
          fake=lambda x, weight, bias: _rows_by(x, weight.shape[0]))
define_op("int8_weight_linear", "int8_weight_linear(x [M, K], qweight int8 [N, K], scales [N]) -> [M, N]: "
                                "x (qweight * scales)^T",
          fake=lambda x, qweight, scales: _rows_by(x, qweight.shape[0]))
define_op("int4_weight_linear", "int4_weight_linear(x [M, K], qweight packed, group_size, scales_and_offsets "
                                "[K/g, N, 2]) -> [M, N]: w = (q - 8) * scale + offset per group of inputs",
          fake=lambda x, qweight, group_size, table: _rows_by(x, table.shape[1]))
define_op("int8_int8_linear", "int8_int8_linear(xq int8 [M, K], x_scales [M, 1], qweight int8 [N, K], "
                              "scales [N]) -> float32 [M, N]: int32 accumulation, then both scales",
          fake=lambda xq, x_scales, qweight, scales: _rows_by(xq, qweight.shape[0], torch.float32))


@implement("linear", "reference")
def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.linear(x, weight, bias)


@implement("int8_weight_linear", "reference")
def int8_weight_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int8pack_mm(x, qweight, scales)
    return F.linear(x, qweight.to(x.dtype)) * scales  # no int8 weight-only kernel in PyTorch for CUDA


SMALL_BATCH = 16  # rows up to which our int8 kernel beats oneDNN's (decode); prefill keeps the reference


@implement("int8_weight_linear", "cpu_int8", devices=("cpu",), priority=-1,
           requirement=cpu_kernels.unavailable_reason)
def int8_weight_linear_cpu_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Activations quantized to int8 in blocks of 32, int8 x int8 dot products, per-block and per-row scales
    (ops/csrc/int8_linear.cpp; AVX2, AVX-VNNI or AVX-512 VNNI) for up to SMALL_BATCH rows; more rows, or K not a
    multiple of 32, run the reference. Opt-in (--ops int8_weight_linear=cpu_int8) until its accuracy is signed off."""
    module = cpu_kernels.kernels() if x.shape[0] <= SMALL_BATCH and x.shape[1] % 32 == 0 else None
    if module is None:
        return int8_weight_linear_reference(x, qweight, scales)
    y = module.int8_linear(x.float().contiguous(), qweight.contiguous(), scales.float().contiguous(),
                           cpu_kernels.isa())
    return y.to(x.dtype)


@implement("int4_weight_linear", "reference")
def int4_weight_linear_reference(x: torch.Tensor, qweight: torch.Tensor, group_size: int,
                                 scales_and_offsets: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, qweight, group_size, scales_and_offsets)
    return torch.ops.aten._weight_int4pack_mm(x, qweight, group_size, scales_and_offsets)


@implement("int8_int8_linear", "reference")
def int8_int8_linear_reference(xq: torch.Tensor, x_scales: torch.Tensor, qweight: torch.Tensor,
                               scales: torch.Tensor) -> torch.Tensor:
    rows = xq.shape[0]
    if xq.device.type == "cuda" and rows <= 16:  # the CUDA kernel needs more than 16 rows
        xq = F.pad(xq, (0, 0, 0, 17 - rows))
    acc = torch._int_mm(xq, qweight.t())[:rows]  # [M, N] int32
    return acc.float() * x_scales * scales
