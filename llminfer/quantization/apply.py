"""Which layers a quantization config covers, and swapping them in a network."""

from __future__ import annotations

import torch
from torch import nn

from llminfer.layers.linear import Linear
from llminfer.layers.rotary import RotaryEmbedding
from llminfer.quantization.config import QuantizationConfig
from llminfer.quantization.layers import QuantizedLinear, empty_quantized_linear


def target_linears(model: nn.Module, config: QuantizationConfig) -> list[tuple[str, Linear]]:
    """The decoder layers' linear projections (and the LM head when asked), in network order."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, Linear) and ".layers." in f".{name}"]
    if config.quantize_lm_head and isinstance(getattr(model, "lm_head", None), Linear):
        targets.append(("lm_head", model.lm_head))
    return targets


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def build_quantized_layers(model: nn.Module, config: QuantizationConfig, device: str | torch.device) -> None:
    """Turn a float skeleton built on the meta device into a quantized network on `device`:
    quantized layers in place of the targeted linears, empty storage for everything else."""
    with torch.device(device):
        for name, linear in target_linears(model, config):  # a quantized LM head is untied from the embedding
            replace_module(model, name, empty_quantized_linear(linear, config))
    materialize(model, device)
    model.quantization = config


def materialize(model: nn.Module, device: str | torch.device) -> None:
    """Give every meta parameter real (uninitialised) storage, keeping ties and attributes such as
    weight_loader; recompute rotary tables."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:
                real = nn.Parameter(torch.empty_like(param, device=device), requires_grad=False)
                real.__dict__.update(param.__dict__)
                made[id(param)] = real
            module._parameters[name] = made[id(param)]
        if isinstance(module, RotaryEmbedding):
            module.reset_cache(device)


def cast_float_parts(model: nn.Module, dtype: torch.dtype) -> None:
    """Embeddings, norms and unquantized linears go to the compute dtype; quantized layers keep their
    own tensors (int8/uint8 weights, float32 scales where the kernel allows)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
