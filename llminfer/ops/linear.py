"""The matrix product of each weight format: float, int8 per channel (A16W8), int4 groups (A16W4) and
int8 x int8 with int32 accumulation (A8W8). Activations are [M, K] rows; weights are [N, K] as in HF
checkpoints (int4 in the kernel's packed layout)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

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
define_op("int4_weight_linear", "int4_weight_linear(x [M, K], qweight, group_size, table) -> [M, N]: int4 levels q "
                                "with a scale and zero point per group of inputs, w = (q - zero) * scale; qweight "
                                "and table in the weight layout of the implementation (INT4_LAYOUTS)",
          fake=lambda x, qweight, group_size, table: _rows_by(x, qweight.shape[0]))
define_op("int8_int8_linear", "int8_int8_linear(xq int8 [M, K], x_scales [M, 1], qweight int8 [N, K], "
                              "scales [N]) -> float32 [M, N]: int32 accumulation, then both scales",
          fake=lambda xq, x_scales, qweight, scales: _rows_by(xq, qweight.shape[0], torch.float32))


@implement("linear", "reference", capturable=True)
def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.linear(x, weight, bias)


DECODE_ROWS = 8  # up to this many rows our kernel beats oneDNN's matmul (bfloat16: 1.5x at 4 rows, 0.8x at 16)


@implement("linear", "cpu_float", devices=("cpu",), priority=10, requirement=cpu_kernels.build_requirement,
           capturable=True)
def linear_cpu_float(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The rows of a decode step times bfloat16 or float32 weights as stored (ops/csrc/float_linear.cpp: AVX-512
    BF16 / AVX-512F or AVX2, float32 accumulation); other dtypes and prompts take the reference's F.linear."""
    if not (x.dtype == weight.dtype and cpu_kernels.takes(x) and 0 < x.shape[0] <= DECODE_ROWS
            and weight.is_contiguous()):
        return F.linear(x, weight, bias)
    y = cpu_kernels.kernels().float_linear(x.contiguous(), weight, cpu_kernels.float_isa())
    return y if bias is None else y + bias


# --- int8 weight layouts: how each implementation holds its weights, packed once at load ----------------------

@dataclass(frozen=True)
class Int8Layout:
    pack: Callable[[torch.Tensor], torch.Tensor]  # int8 [N, K] -> qweight in the layout
    rows: Callable[[torch.Tensor, int, int], torch.Tensor]  # (qweight, N, K) -> int8 [N, K] again


TILE_ROWS, TILE_COLUMNS = 4, 64


def _pack_tiles4x64(q: torch.Tensor) -> torch.Tensor:
    """Our kernel's layout (ops/csrc/quantized_linear.cpp): rows in tiles of 4 and K in chunks of 64 (both zero
    padded), each tile [K/64, 4, 64], so that the kernel reads a tile as one sequential stream."""
    n, k = q.shape
    padded_n, padded_k = -(-n // TILE_ROWS) * TILE_ROWS, -(-k // TILE_COLUMNS) * TILE_COLUMNS
    padded = F.pad(q, (0, padded_k - k, 0, padded_n - n))
    tiles = padded.view(padded_n // TILE_ROWS, TILE_ROWS, padded_k // TILE_COLUMNS, TILE_COLUMNS)
    return tiles.transpose(1, 2).contiguous()


def _tiles4x64_rows(qweight: torch.Tensor, n: int, k: int) -> torch.Tensor:
    tiles = qweight.transpose(1, 2)  # [N/4, 4, K/64, 64]
    return tiles.reshape(-1, qweight.shape[1] * TILE_COLUMNS)[:n, :k].contiguous()


INT8_LAYOUTS = {"rows": Int8Layout(lambda q: q, lambda qweight, n, k: qweight),
                "tiles4x64": Int8Layout(_pack_tiles4x64, _tiles4x64_rows)}


@implement("int8_weight_linear", "reference", weight_layout="rows", capturable=True)
def int8_weight_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int8pack_mm(x, qweight, scales.to(x.dtype))
    return F.linear(x, qweight.to(x.dtype)) * scales.to(x.dtype)  # no int8 weight-only kernel in PyTorch for CUDA


def _kernel_takes(x: torch.Tensor) -> bool:
    return cpu_kernels.takes(x) and x.shape[0] > 0


# From this many rows (a prompt), the weight dequantized once per call through a float matmul beats our integer dot
# products per block of 32 (docs/PERFORMANCE.md): bfloat16 where the CPU multiplies it natively (AVX-512 BF16, AMX;
# ~2x at 128 rows and more), float32 from 256 rows (int8: 3.1 against 3.8 ms at 512 x 1536 x 576, int4: 2.9
# against 5.1). The rows then keep their float values (no int8 activation rounding).
PROMPT_ROWS = {torch.bfloat16: 64, torch.float32: 256}


def _dequantized_matmul_wins(x: torch.Tensor) -> bool:
    if x.dtype == torch.bfloat16 and not cpu_kernels.has_bf16_dot_products():
        return False
    return x.shape[0] >= PROMPT_ROWS.get(x.dtype, 1)


LARGE_WEIGHT = 2**22  # int8 weights of more elements: their dequantized copy no longer stays in the caches


def _int8_dequantized_matmul_wins(x: torch.Tensor, weight_elements: int) -> bool:
    """With AVX-512 VNNI (no AMX), dequantizing costs ~0.1 ns an element while the copy stays in the caches and
    ~0.65 ns past them (49152 x 576: 18 ms), against ~1 ps a multiply-add saved per row (bfloat16 matmul 700 G
    against our kernel's 414 G multiply-adds/s): at 1536 x 576 the float matmul wins from 32-64 rows, for the
    LM head only from ~256 (docs/PERFORMANCE.md, eighth session)."""
    if cpu_kernels.integer_isa() == "avx512_vnni" and "amx_bf16" not in cpu_kernels.cpu_flags() \
            and weight_elements > LARGE_WEIGHT:
        return x.shape[0] >= 512
    return _dequantized_matmul_wins(x)


@implement("int8_weight_linear", "cpu_int8", devices=("cpu",), priority=10, weight_layout="tiles4x64",
           requirement=cpu_kernels.build_requirement, capturable=True)
def int8_weight_linear_cpu_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Activations quantized to int8 in blocks of 32 inside the kernel (the last block zero padded), int8 x int8
    dot products, per-block and per-row scales (ops/csrc/quantized_linear.cpp; AVX2, AVX-VNNI or AVX-512 VNNI),
    weights in the tiles4x64 layout. Other dtypes (float16) and prompts (PROMPT_ROWS) take the dequantized weight
    through a float matmul."""
    kernels = cpu_kernels.kernels()
    if _kernel_takes(x) and not _int8_dequantized_matmul_wins(x, scales.numel() * x.shape[1]):
        return kernels.int8_linear(x.contiguous(), qweight, scales, cpu_kernels.isa())
    dtype = x.dtype if cpu_kernels.takes(x) else torch.float32
    return F.linear(x, kernels.dequantize_int8(qweight, scales, x.shape[1], dtype).to(x.dtype))


# --- int4 weight layouts: how each implementation holds its weights, packed once at load -----------------------

@dataclass(frozen=True)
class Int4Layout:
    # (levels uint8 [N, K] in [0, 15], scale [N, K/g], zero [N, K/g], group size, compute dtype) -> (qweight, table)
    pack: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.dtype], tuple[torch.Tensor, torch.Tensor]]
    # (qweight, table, group size, K) -> the levels uint8 [N, K] again
    levels: Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]
    # (table, group size, K) -> (scale, zero) float32 [N, K/g] that pack back to the same table bit for bit
    grid: Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


def _pack_tinygemm(levels: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's int4 kernels: an opaque packing, and a [K/g, N, 2] table of (scale, offset) in the compute dtype
    for w = (q - 8) * scale + offset."""
    if levels.device.type == "cpu":
        qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.to(torch.int32), 1)
    else:
        high_first = (levels[:, 0::2] << 4 | levels[:, 1::2]).to(torch.uint8)  # the CUDA kernel's nibble order
        qweight = torch.ops.aten._convert_weight_to_int4pack(high_first, 8)
    scale, zero = scale.float(), zero.float()
    table = torch.stack([scale, (8 - zero) * scale], dim=-1).transpose(0, 1).contiguous()
    return qweight, table.to(dtype)


def _tinygemm_levels(qweight: torch.Tensor, table: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """The opaque packing read back by multiplying with the identity: with scale 1 and offset 0 the kernel
    returns q - 8 exactly."""
    unit = torch.zeros_like(table)
    unit[..., 0] = 1
    eye = torch.eye(k, dtype=table.dtype, device=qweight.device)
    rows = [int4_weight_linear_reference(eye[start:start + 1024], qweight, group_size, unit)
            for start in range(0, k, 1024)]
    return (torch.cat(rows).T.float() + 8).round().to(torch.uint8)


def _tinygemm_grid(table: torch.Tensor, group_size: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    table = table.float().transpose(0, 1)  # [N, K/g, 2]
    scale = table[..., 0]
    return scale, 8 - table[..., 1] / scale


SMALLEST_FLOAT16_SCALE = 2.0 ** -24  # the smallest float16 above zero: a scale never rounds to 0


def _pack_blocks32(levels: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Our kernel's layout (ops/csrc/quantized_linear.cpp): K padded to 64; each 64 levels are 32 bytes, the first
    block of 32 in the low nibbles and the second in the high ones; a float16 (scale, min) per block of 32,
    w = q * scale + min, [N, K/32, 2]."""
    n, k = levels.shape
    padded = -(-k // 64) * 64
    blocks = F.pad(levels, (0, padded - k)).view(n, padded // 64, 2, 32)
    qweight = (blocks[:, :, 0] | blocks[:, :, 1] << 4).reshape(n, padded // 2).contiguous()
    per_block = group_size // 32
    s = scale.half().clamp(min=SMALLEST_FLOAT16_SCALE)  # what the table holds, so that the grid reads back exactly
    m = (-zero.float() * scale.float()).half()
    table = torch.stack([s, m], dim=-1).repeat_interleave(per_block, dim=1)  # [N, K/32, 2]
    return qweight, F.pad(table, (0, 0, 0, padded // 32 - k // 32)).contiguous()


def _blocks32_levels(qweight: torch.Tensor, table: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    n = qweight.shape[0]
    pairs = qweight.view(n, -1, 1, 32)
    return torch.cat([pairs & 15, pairs >> 4], dim=2).reshape(n, -1)[:, :k].contiguous()


def _blocks32_grid(table: torch.Tensor, group_size: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    first_blocks = table[:, : k // 32 : group_size // 32].float()  # each group's first block
    scale = first_blocks[..., 0]
    return scale, -first_blocks[..., 1] / scale


PANEL_COLUMNS = 8


def _pack_panels8(levels: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Our kernel's layout for any number of rows (ops/csrc/quantized_gemm.cpp): panels of 8 output columns (N zero
    padded), blocks of 32 inputs (K zero padded); block b of a panel is 4 x 32 bytes, vector j holding levels
    k = 32b + 8j + t (low nibble) and 32b + 8j + 4 + t (high) of column c at byte 4c + t. The table holds float16
    (scales, minimums) of the panel's 8 columns per block, [Np/8, Kb, 2, 8], w = q * scale + min."""
    n, k = levels.shape
    padded_n, blocks = -(-n // PANEL_COLUMNS) * PANEL_COLUMNS, -(-k // 32)
    grid = F.pad(levels, (0, blocks * 32 - k, 0, padded_n - n)).view(padded_n // 8, 8, blocks, 4, 2, 4)
    grid = grid.permute(0, 2, 3, 1, 5, 4)  # panel, block, j, column, t, low/high
    qweight = (grid[..., 0] | grid[..., 1] << 4).reshape(padded_n // 8, blocks, 128).contiguous()
    s = scale.half().clamp(min=SMALLEST_FLOAT16_SCALE)  # what the table holds, so that the grid reads back exactly
    m = (-zero.float() * scale.float()).half()
    per_block = group_size // 32
    table = torch.stack([s.repeat_interleave(per_block, dim=1), m.repeat_interleave(per_block, dim=1)], dim=1)
    table = F.pad(table[..., :blocks], (0, 0, 0, 0, 0, padded_n - n))  # [Np, 2, Kb]
    return qweight, table.view(padded_n // 8, 8, 2, blocks).permute(0, 3, 2, 1).contiguous()


def _panels8_levels(qweight: torch.Tensor, table: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    panels, blocks = qweight.shape[:2]
    grid = qweight.view(panels, blocks, 4, 8, 4)
    grid = torch.stack([grid & 15, grid >> 4], dim=-1)  # panel, block, j, column, t, low/high
    return grid.permute(0, 3, 1, 2, 5, 4).reshape(panels * 8, blocks * 32)[:_panel_columns(table), :k].contiguous()


def _panels8_grid(table: torch.Tensor, group_size: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = table.permute(0, 3, 2, 1).reshape(-1, 2, table.shape[1])[:_panel_columns(table)].float()  # [N, 2, Kb]
    first_blocks = rows[:, :, : -(-k // 32) : group_size // 32]
    scale = first_blocks[:, 0]
    return scale, -first_blocks[:, 1] / scale


def _panels8_dequantized(qweight: torch.Tensor, table: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """float32 [N, K]: levels * scale + min, per block of 32."""
    levels = _panels8_levels(qweight, table, 32, k).float()
    rows = table.permute(0, 3, 2, 1).reshape(-1, 2, table.shape[1])[:n].float()
    scale = rows[:, 0].repeat_interleave(32, dim=1)[:, :k]
    minimum = rows[:, 1].repeat_interleave(32, dim=1)[:, :k]
    return levels * scale + minimum


INT4_LAYOUTS = {"tinygemm": Int4Layout(_pack_tinygemm, _tinygemm_levels, _tinygemm_grid),
                "blocks32": Int4Layout(_pack_blocks32, _blocks32_levels, _blocks32_grid),
                "panels8": Int4Layout(_pack_panels8, _panels8_levels, _panels8_grid)}


@implement("int4_weight_linear", "reference", weight_layout="tinygemm", capturable=True)
def int4_weight_linear_reference(x: torch.Tensor, qweight: torch.Tensor, group_size: int,
                                 table: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, qweight, group_size, table)
    return torch.ops.aten._weight_int4pack_mm(x, qweight, group_size, table)


@implement("int4_weight_linear", "cpu_int4", devices=("cpu",), priority=10, weight_layout="panels8",
           requirement=cpu_kernels.build_requirement, capturable=True)
def int4_weight_linear_cpu_int4(x: torch.Tensor, qweight: torch.Tensor, group_size: int,
                                table: torch.Tensor) -> torch.Tensor:
    """Q4_1-style: activations quantized to int8 in blocks of 32 inside the kernel, unsigned levels x signed
    activations summed exactly per block in int16, scaled by both blocks' scales, plus min x the block's activation
    sum; 8 output columns per register (16 with AVX-512 VNNI; ops/csrc/quantized_gemm.cpp), for one row as for a
    batch (AVX2: 2.7-3.3x the blocks32 kernel from 1 to 64 rows, docs/PERFORMANCE.md). Other dtypes (float16)
    and, where bfloat16 has dot products but the integer kernels lack AVX-512 VNNI, prompts (PROMPT_ROWS) take
    the dequantized weight through a float matmul."""
    columns = _panel_columns(table)
    if _kernel_takes(x) and not _int4_dequantized_matmul_wins(x):
        return cpu_kernels.kernels().int4_gemm(x.contiguous(), qweight, table, columns, cpu_kernels.isa())
    return F.linear(x, _panels8_dequantized(qweight, table, columns, x.shape[1]).to(x.dtype))


def _int4_dequantized_matmul_wins(x: torch.Tensor) -> bool:
    """With AVX-512 VNNI (and no AMX) the int4 GEMM beats even a dequantized weight's bfloat16 matmul on
    AVX512-BF16 at every row count measured (64-1024 rows: 1.05-1.3x before the dequantization's own cost,
    which is 2-6 ms a layer and 230 ms for the LM head; docs/PERFORMANCE.md, eighth session)."""
    if cpu_kernels.integer_isa() == "avx512_vnni" and "amx_bf16" not in cpu_kernels.cpu_flags():
        return False
    return _dequantized_matmul_wins(x)


def _panel_columns(table: torch.Tensor) -> int:
    """N of a panels8 table: padding columns have scale 0, real ones at least float16's smallest (counted once per
    table, remembered on it: the count is a device sync)."""
    columns = getattr(table, "_panel_columns", None)
    if columns is None:
        columns = int(table.shape[0] * PANEL_COLUMNS - (table[-1, 0, 0] == 0).sum())
        table._panel_columns = columns
    return columns


@implement("int8_int8_linear", "reference", capturable=True)
def int8_int8_linear_reference(xq: torch.Tensor, x_scales: torch.Tensor, qweight: torch.Tensor,
                               scales: torch.Tensor) -> torch.Tensor:
    rows = xq.shape[0]
    if xq.device.type == "cuda" and rows <= 16:  # the CUDA kernel needs more than 16 rows
        xq = F.pad(xq, (0, 0, 0, 17 - rows))
    acc = torch._int_mm(xq, qweight.t())[:rows]  # [M, N] int32
    return acc.float() * x_scales * scales
