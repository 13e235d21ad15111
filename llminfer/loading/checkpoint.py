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
        return self.model_config()

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
