"""Linear layers that know how checkpoint tensors load into them, and which share of them a rank holds.

The model file asks the LayerFactory for each projection by its role; the product itself is the `linear` op of
the layer's OpSet. Quantized layers (llminfer.quantization.layers) follow the same loading and splitting
contract for their own tensors, with their own constructors.
"""

from __future__ import annotations

import torch
from torch import nn

from llminfer.layers.parallel import REPLICATED, Parallel, ParallelOutput, TensorSplit
from llminfer.ops import OpSet, default_ops


class Linear(ParallelOutput, nn.Module):
    """y = x W^T (+ b), with W stored [out_features, in_features] as in HF checkpoints."""

    parts: tuple[str | int, ...] | None = None  # a fused projection's parts, in output order

    def __init__(self, in_features: int, out_features: int, bias: bool = False, ops: OpSet | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.ops = ops or default_ops()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self.weight_loader  # how a checkpoint tensor lands in this parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        bias = self.bias_in_product
        y = self.ops.linear(x.reshape(-1, self.in_features), self.weight, bias)
        if self.parallel is not None:
            y = self.combine(y, bias_added=bias is not None)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def tensor_split(self, suffix: str, shard: str | int | None = None) -> TensorSplit:
        """The share of the checkpoint tensor `<prefix>.<suffix>` (part `shard` of a fused one) this rank holds."""
        parallel: Parallel | None = self.parallel
        if parallel is None:
            return REPLICATED
        if parallel.role == "row":  # one input column range; the bias belongs to every output, added once
            return REPLICATED if suffix == "bias" else parallel.columns()
        return parallel.rows(shard, self.parts)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | str | None = None) -> None:
        _copy_checked(param.data, loaded)


class MergedLinear(Linear):
    """Several projections of the same input fused into one matmul (q|k|v, gate|up).

    `shards` names the parts in output order with their widths; checkpoints store them
    separately and each lands in its own row range.
    """

    def __init__(self, in_features: int, shards: dict[str | int, int], bias: bool = False,
                 ops: OpSet | None = None) -> None:
        super().__init__(in_features, sum(shards.values()), bias, ops)
        self.parts = tuple(shards)
        self.shard_offsets: dict[str | int, tuple[int, int]] = {}
        offset = 0
        for name, width in shards.items():
            self.shard_offsets[name] = (offset, width)
            offset += width

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | str | None = None) -> None:
        if shard is None:  # a checkpoint that stores the projection fused already (Phi-3's qkv_proj, gate_up_proj)
            _copy_checked(param.data, loaded)
            return
        offset, width = self.shard_offsets[shard]
        _copy_checked(param.data.narrow(0, offset, width), loaded)


def _copy_checked(destination: torch.Tensor, loaded: torch.Tensor) -> None:
    if destination.shape != loaded.shape:
        raise ValueError(f"expected shape {tuple(destination.shape)}, got {tuple(loaded.shape)}")
    destination.copy_(loaded)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    _copy_checked(param.data, loaded)
