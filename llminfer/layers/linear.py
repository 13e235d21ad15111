"""Linear layers that know how checkpoint tensors load into them.

The model file only says which projections exist; the product itself is the `linear` op of the layer's
OpSet. Quantized layers (llminfer.quantization.layers) take a float layer's place with the same weight
loading contract for their own tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from llminfer.ops import OpSet, default_ops


class Linear(nn.Module):
    """y = x W^T (+ b), with W stored [out_features, in_features] as in HF checkpoints."""

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
        y = self.ops.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

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
