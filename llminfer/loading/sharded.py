"""A checkpoint written by `llminfer shard`: one folder per tensor-parallel rank, and strategy.json saying how
each tensor was split (see llminfer.parallel.shard, which writes and merges it)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from llminfer.config import QUANTIZATION_MANIFEST, ModelConfig, QuantizationConfig
from llminfer.errors import ConfigError, ModelFormatError
from llminfer.files import read_json_object
from llminfer.loading.checkpoint import Checkpoint
from llminfer.loading.hf_folder import OUR_CONFIG, HFFolderCheckpoint, read_quantization_manifest

STRATEGY = "strategy.json"


class ShardedCheckpoint(Checkpoint):
    """A folder written by `llminfer shard`: rank r reads rank_r/ only."""

    format = "llminfer-tensor-parallel"

    def __init__(self, path: Path, name: str | None = None) -> None:
        super().__init__(name or str(path))
        self.path = path
        self.strategy = read_json_object(path / STRATEGY)
        self.tensor_parallel_size = self.strategy.get("tensor_parallel_size")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ModelFormatError(f"{path / STRATEGY}: missing 'tensor_parallel_size'")
        for rank in range(self.tensor_parallel_size):
            if not (path / f"rank_{rank}").is_dir():
                raise ModelFormatError(f"{path}: sharded for {self.tensor_parallel_size} ranks, "
                                       f"rank_{rank}/ is missing")

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(read_json_object(self.path / OUR_CONFIG), str(self.path / OUR_CONFIG))

    def tensor_names(self) -> list[str]:
        return list(self.strategy["tensors"])

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise ConfigError(f"{self.name}: sharded for {self.tensor_parallel_size} ranks; run it with "
                          f"--tensor-parallel-size {self.tensor_parallel_size}")

    def rank_tensors(self, rank: int, world_size: int) -> Iterator[tuple[str, torch.Tensor]]:
        if world_size != self.tensor_parallel_size:
            raise ConfigError(f"{self.name}: sharded for {self.tensor_parallel_size} ranks, but running with "
                              f"{world_size}; use --tensor-parallel-size {self.tensor_parallel_size} or shard the "
                              "original checkpoint again")
        return HFFolderCheckpoint(self.path / f"rank_{rank}").named_tensors()

    def quantization_config(self) -> QuantizationConfig | None:
        if not (self.path / QUANTIZATION_MANIFEST).is_file():
            return None
        full_shapes = {name: (entry.get("dtype"), entry["shape"]) for name, entry in self.strategy["tensors"].items()}
        return read_quantization_manifest(self.path, full_shapes)

    def tokenizer(self):
        from llminfer.tokenizer import Tokenizer

        return Tokenizer.from_folder(self.path) if Tokenizer.folder_has_tokenizer(self.path) else None
