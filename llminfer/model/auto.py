"""Build a network from a config, and load one from any checkpoint we can read."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from llminfer.config import DTYPES, ModelConfig, load_model_config_file
from llminfer.errors import ConfigError
from llminfer.model.base import CausalLM
from llminfer.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

# model_type -> network class. Llama, Mistral and Qwen2 differ only in config fields.
MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
}


def build_model(config: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> CausalLM:
    """An uninitialised network of the config's shape (weights are loaded afterwards)."""
    # Create parameters directly in the target dtype and device: no float32 copy of a bf16 model.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MODEL_REGISTRY[config.model_type](config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


class AutoModel:
    """`AutoModel.from_pretrained(path)` or `AutoModel.from_config(file)` then `.load_weights(...)`."""

    @staticmethod
    def from_config(config: ModelConfig | str | Path, dtype: str = "float32", device: str = "cpu",
                    seed: int | None = 0) -> CausalLM:
        """A network with small random weights, built from a ModelConfig or a YAML/JSON config file."""
        if not isinstance(config, ModelConfig):
            config = load_model_config_file(config)
        model = build_model(config, _dtype(dtype), device)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        return model

    @staticmethod
    def from_pretrained(model: str | Path, dtype: str = "float32", device: str = "cpu") -> CausalLM:
        """Load an HF folder, a GGUF file, a converted folder, a hub id or an alias like 'smollm2-135m'."""
        from llminfer.loading import open_checkpoint

        source = open_checkpoint(str(model))
        network = build_model(source.model_config(), _dtype(dtype), device)
        network.load_weights(source.named_tensors(), source=source.name)
        network.tokenizer = source.tokenizer()
        return network


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype '{name}' is not supported (expected one of {', '.join(DTYPES)})")
    return DTYPES[name]
