"""Which layers a quantization config covers, and putting quantized layers in their place."""

from __future__ import annotations

import torch
from torch import nn

from llminfer.config import QuantizationConfig
from llminfer.layers.linear import Linear
from llminfer.quantization.layers import QuantizedLinear
from llminfer.quantization.methods import QuantizationMethod


def target_linears(model: nn.Module, config: QuantizationConfig) -> list[tuple[str, Linear]]:
    """The float projections the config quantizes, by the role each was built with, in network order."""
    method = QuantizationMethod(config)
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, Linear) and method.covers(getattr(module, "role", None))]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def cast_float_parts(model: nn.Module, dtype: torch.dtype) -> None:
    """Embeddings, norms and unquantized linears go to the compute dtype; quantized layers keep their
    own tensors (int8/uint8 weights, float32 scales where the kernel allows)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
