"""`llminfer shard SRC --tp N -o DST`: split a checkpoint offline so that each rank reads only its own files.

DST holds the model config and tokenizer, `rank_0/ ... rank_{N-1}/` (safetensors, HF tensor names, each rank's
slices) and `strategy.json`: for every tensor, its split axis (or "replicated"), its full shape and each rank's
(start, length) ranges along the axis (one per part of a fused q|k|v or gate|up projection), so the shards
can be merged back bit for bit.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Iterator

import torch

from llminfer.config import DTYPES, ModelConfig
from llminfer.errors import ConfigError, ModelFormatError
from llminfer.files import read_json_object
from llminfer.loading.checkpoint import Checkpoint
from llminfer.loading.hf_folder import OUR_CONFIG, HFFolderCheckpoint
from llminfer.parallel.sharding import ShardPlan, check_tp_size
from llminfer.quantization.config import MANIFEST_FILE, QuantizationConfig

STRATEGY = "strategy.json"


def shard_checkpoint(source: str, destination: str | Path, world_size: int, dtype: str | None = None,
                     overwrite: bool = False, max_shard_bytes: int = 2 * 1024**3) -> Path:
    from llminfer.loading import open_checkpoint
    from llminfer.loading.convert import staged_folder, write_manifest, write_model_files, write_shards

    checkpoint = open_checkpoint(source)
    if isinstance(checkpoint, ShardedCheckpoint):
        raise ConfigError(f"{source}: is already sharded (for {checkpoint.tensor_parallel_size} ranks); "
                          "shard the unsharded checkpoint")
    quantization = checkpoint.quantization_config()
    check_tp_size(checkpoint.config, world_size, source, quantization)
    if dtype is not None and (quantization is not None or dtype not in DTYPES):
        raise ConfigError(f"--dtype '{dtype}' is not supported " + (
            "for a quantized checkpoint (its tensors keep their dtypes)" if quantization else
            f"(expected one of {', '.join(DTYPES)})"))
    target = None if quantization else DTYPES[dtype or checkpoint.config.torch_dtype]
    plans = [ShardPlan(checkpoint.config, rank, world_size, quantization) for rank in range(world_size)]
    strategy: dict[str, dict] = {}
    with staged_folder(Path(destination), overwrite) as staging:
        for plan in plans:  # one pass over the source per rank: only one tensor is in memory at a time
            print(f"llminfer: writing rank {plan.rank} of {world_size}", file=sys.stderr, flush=True)
            folder = staging / f"rank_{plan.rank}"
            folder.mkdir()
            write_shards(_rank_slices(checkpoint, plan, strategy, target), folder, max_shard_bytes, checkpoint.name)
        write_model_files(staging, checkpoint.config, checkpoint.tokenizer())
        if quantization is not None:  # the manifest lists the full tensors; strategy.json gives each rank's share
            shutil.copy(checkpoint.path / MANIFEST_FILE, staging / MANIFEST_FILE)
        (staging / STRATEGY).write_text(json.dumps({"format": "llminfer-tensor-parallel",
                                                    "tensor_parallel_size": world_size, "source": source,
                                                    "tensors": strategy}, indent=1))
        write_manifest(staging, {"source": source, "tensor_parallel_size": world_size,
                                 "dtype": str(target).replace("torch.", "") if target else "as stored",
                                 "quantization": quantization.describe() if quantization else None,
                                 "num_tensors": len(strategy)})
    return Path(destination)


def _rank_slices(checkpoint: Checkpoint, plan: ShardPlan, strategy: dict[str, dict],
                 dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """One rank's slice of every tensor, recording each split in `strategy` on the way."""
    for name, tensor in checkpoint.named_tensors():
        if name == "lm_head.weight" and checkpoint.config.tie_word_embeddings:
            continue
        split = plan.split(name)
        stored_dtype = str(dtype or tensor.dtype).replace("torch.", "")
        entry = strategy.setdefault(name, {"split": "replicated" if split.axis is None else split.axis,
                                           "shape": list(tensor.shape), "dtype": stored_dtype, "ranks": []})
        if split.axis is not None:
            entry["ranks"].append([list(r) for r in split.ranges])
        part = split.take(tensor)
        yield name, (part.to(dtype) if dtype is not None else part).clone()


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
        from llminfer.quantization.save import read_quantization_manifest

        if not (self.path / MANIFEST_FILE).is_file():
            return None
        full_shapes = {name: (entry.get("dtype"), entry["shape"]) for name, entry in self.strategy["tensors"].items()}
        return read_quantization_manifest(self.path, full_shapes)

    def tokenizer(self):
        from llminfer.tokenizer import Tokenizer

        return Tokenizer.from_folder(self.path) if Tokenizer.folder_has_tokenizer(self.path) else None


def merge_shards(path: str | Path) -> dict[str, torch.Tensor]:
    """The unsharded tensors back, each slice put where strategy.json says it came from."""
    checkpoint = ShardedCheckpoint(Path(path))
    n = checkpoint.tensor_parallel_size
    per_rank = [dict(HFFolderCheckpoint(checkpoint.path / f"rank_{r}").named_tensors()) for r in range(n)]
    merged = {}
    for name, entry in checkpoint.strategy["tensors"].items():
        if entry["split"] == "replicated":
            merged[name] = per_rank[0][name]
            continue
        full = torch.empty(entry["shape"], dtype=per_rank[0][name].dtype)
        for rank, ranges in enumerate(entry["ranks"]):
            offset = 0  # a fused projection's parts lie one after the other in the rank's tensor
            for start, length in ranges:
                piece = per_rank[rank][name].narrow(entry["split"], offset, length)
                full.narrow(entry["split"], start, length).copy_(piece)
                offset += length
        merged[name] = full
    return merged
