"""The weight-source interface that every checkpoint format implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cached_property
from typing import TYPE_CHECKING, Iterator

import torch

from llminfer.config import ModelConfig
from llminfer.errors import ConfigError

if TYPE_CHECKING:
    from llminfer.config import QuantizationConfig
    from llminfer.tokenizer import Tokenizer


class Checkpoint(ABC):
    """A readable checkpoint: its config, its tensors under Hugging Face names, its tokenizer."""

    format: str = "?"

    def __init__(self, name: str) -> None:
        self.name = name  # the path as the user gave it, for messages

    @cached_property
    def config(self) -> ModelConfig:
        config = self.model_config()
        shapes = self.tensor_shapes()
        if shapes is not None:  # before anything is built: a config that disagrees with the file allocates nothing
            check_config_against_tensors(config, shapes, self.name, quantized=self.quantization_config() is not None)
        return config

    def tensor_shapes(self) -> dict[str, tuple[str, list[int]]] | None:
        """HF tensor name -> (stored dtype, shape in HF layout), from the file headers alone (None: unknown
        without reading the tensors, as for pickled .bin files)."""
        return None

    @abstractmethod
    def model_config(self) -> ModelConfig: ...

    @abstractmethod
    def tensor_names(self) -> list[str]: ...

    @abstractmethod
    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors one at a time (memory-mapped where the format allows), in HF naming and layout."""

    @abstractmethod
    def tokenizer(self) -> Tokenizer | None: ...

    def quantization_config(self) -> QuantizationConfig | None:
        """How the checkpoint's linear layers are quantized (None: float weights)."""
        return None

    def sampling_defaults(self) -> dict[str, float | int]:
        """The model's own sampling defaults (SamplingParams fields), if its files carry any."""
        return {}

    def check_compatible(self, config: ModelConfig) -> None:
        mine = self.config
        for field in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "intermediate_size", "vocab_size"):
            if getattr(mine, field) != getattr(config, field):
                raise ConfigError(f"{self.name}: checkpoint has {field}={getattr(mine, field)}, "
                                  f"the model was built with {getattr(config, field)}")


INTEGER_DTYPES = ("int8", "uint8", "int16", "int32", "int64", "bool", "I8", "U8", "I16", "I32", "I64", "BOOL")


def expected_shapes(config: ModelConfig) -> dict[str, list[int]]:
    """The shapes that the config's dimensions imply for tensors every float checkpoint has (layer 0 stands for
    all layers; fused q|k|v and gate|up checkpoints are checked through their fused names)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    layer = "model.layers.0."
    return {"model.embed_tokens.weight": [v, h], "lm_head.weight": [v, h],
            layer + "self_attn.q_proj.weight": [q, h], layer + "self_attn.k_proj.weight": [kv, h],
            layer + "self_attn.v_proj.weight": [kv, h], layer + "self_attn.o_proj.weight": [h, q],
            layer + "self_attn.qkv_proj.weight": [q + 2 * kv, h], layer + "mlp.gate_proj.weight": [i, h],
            layer + "mlp.up_proj.weight": [i, h], layer + "mlp.down_proj.weight": [h, i],
            layer + "mlp.gate_up_proj.weight": [2 * i, h]}


def check_config_against_tensors(config: ModelConfig, shapes: dict[str, tuple[str, list[int]]], source: str,
                                 quantized: bool = False) -> None:
    """Every config dimension against the tensors on disk, so that `hidden_size: 1e9` or a million layers is a
    one-line error before any allocation, not an allocator failure after one."""
    layer_indices = {int(name.split(".")[2]) for name in shapes
                     if name.startswith("model.layers.") and name.split(".")[2].isdigit()}
    if layer_indices and (max(layer_indices) + 1 != config.num_hidden_layers or
                          len(layer_indices) != config.num_hidden_layers):
        raise ConfigError(f"{source}: config says num_hidden_layers={config.num_hidden_layers}, the checkpoint has "
                          f"tensors for {len(layer_indices)} layers (0..{max(layer_indices)})")
    if "model.embed_tokens.weight" not in shapes and layer_indices:
        raise ConfigError(f"{source}: no model.embed_tokens.weight tensor (expected [vocab_size, hidden_size])")
    for name, expected in expected_shapes(config).items():
        if name not in shapes:
            continue
        dtype, shape = shapes[name]
        if dtype in INTEGER_DTYPES:
            if quantized:
                continue  # packed integer weights: their shapes are the quantization manifest's to check
            raise ConfigError(f"{source}: tensor '{name}' is stored as {dtype}; expected a float weight "
                              "(float32, float16 or bfloat16)")
        if list(shape) != expected:
            raise ConfigError(f"{source}: tensor '{name}' has shape {list(shape)}, the config implies {expected} "
                              f"(hidden_size={config.hidden_size}, intermediate_size={config.intermediate_size}, "
                              f"vocab_size={config.vocab_size}, heads={config.num_attention_heads}/"
                              f"{config.num_key_value_heads} x head_dim {config.head_dim})")
    if not quantized:
        for name, (dtype, _) in shapes.items():
            if dtype in INTEGER_DTYPES:
                raise ConfigError(f"{source}: tensor '{name}' is stored as {dtype}; expected a float weight")
