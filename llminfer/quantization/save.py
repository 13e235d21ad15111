"""Quantized checkpoints: packed safetensors + model config + tokenizer + a quantization manifest.

quantization.json records the scheme, group size, algorithm, calibration data (source, sha256, tokens), which
tensors are quantized (name, dtype, shape), what stays in the compute dtype, and the weight memory.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from llminfer.config import QUANTIZATION_MANIFEST, QuantizationConfig
from llminfer.errors import ConfigError
from llminfer.loading.convert import staged_folder, write_manifest, write_model_files, write_shards
from llminfer.quantization.layers import QuantizedLinear


def quantized_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a quantized network under its checkpoint name (tied parameters once)."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, QuantizedLinear):
            for suffix, tensor in module.checkpoint_tensors().items():
                yield f"{prefix}{suffix}", tensor.detach().cpu()
            if module.bias is not None:
                yield f"{prefix}bias", module.bias.detach().cpu()
            continue
        for suffix, param in module.named_parameters(recurse=False):
            if id(param) not in seen:  # an LM head tied to the embedding is stored once
                seen.add(id(param))
                yield f"{prefix}{suffix}", param.detach().cpu()


def weight_memory(model: nn.Module) -> dict[str, int | float]:
    """Bytes the quantized linear layers hold in memory (packed weights, scales, zero points; biases aside),
    the same layers in float32, and everything else (embeddings, norms, unquantized LM head)."""
    quantized = float32 = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            tensors = [t for name, t in [*module.named_parameters(), *module.named_buffers()] if name != "bias"]
            quantized += sum(t.numel() * t.element_size() for t in tensors)
            float32 += module.in_features * module.out_features * 4
    inside = {id(t) for m in model.modules() if isinstance(m, QuantizedLinear) for t in m.parameters()}
    other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in inside)
    return {"quantized_linear_bytes": quantized, "same_linears_float32_bytes": float32,
            "ratio_to_float32": round(quantized / float32, 4) if float32 else 0.0, "other_bytes": other}


def save_quantized(model: nn.Module, path: str | Path, overwrite: bool = False,
                   max_shard_bytes: int = 2 * 1024**3, source: str | None = None) -> Path:
    """Write a converted (quantized) model so that LLM(path) / AutoModel.from_pretrained(path) load it
    directly. Written into a temporary folder and renamed: a failure leaves nothing behind."""
    qconfig: QuantizationConfig | None = getattr(model, "quantization", None)
    if qconfig is None:
        raise ConfigError("save_quantized: the model is not quantized (run convert() first)")
    destination = Path(path)
    quantized: dict[str, dict] = {}

    def recorded() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in quantized_tensors(model):
            if _is_quantized_name(model, name):
                quantized[name] = {"dtype": str(tensor.dtype).replace("torch.", ""), "shape": list(tensor.shape)}
            yield name, tensor

    with staged_folder(destination, overwrite) as staging:
        weight_map = write_shards(recorded(), staging, max_shard_bytes, "model")
        config = replace(model.config, torch_dtype=qconfig.compute_dtype)
        write_model_files(staging, config, getattr(model, "tokenizer", None))
        manifest = {
            "quantization": qconfig.to_dict(),
            "quantized_tensors": quantized,
            "kept_in_compute_dtype": sorted(name for name in weight_map if name not in quantized),
            "weight_memory": weight_memory(model),
        }
        (staging / QUANTIZATION_MANIFEST).write_text(json.dumps(manifest, indent=2))
        write_manifest(staging, {"source": source or "in-memory model", "dtype": qconfig.compute_dtype,
                                 "quantization": qconfig.describe(), "num_tensors": len(weight_map)})
    return destination


def _is_quantized_name(model: nn.Module, tensor_name: str) -> bool:
    module_name, _, suffix = tensor_name.rpartition(".")
    try:
        return isinstance(model.get_submodule(module_name), QuantizedLinear) and suffix != "bias"
    except AttributeError:
        return False
