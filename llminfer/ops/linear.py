"""The matrix product of each weight format: float, int8 per channel (A16W8), int4 groups (A16W4) and
int8 x int8 with int32 accumulation (A8W8). Activations are [M, K] rows; weights are [N, K] as in HF
checkpoints (int4 in the kernel's packed layout)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

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
