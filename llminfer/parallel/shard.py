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

from llminfer.config import DTYPES, QUANTIZATION_MANIFEST
from llminfer.errors import ConfigError
from llminfer.loading.checkpoint import Checkpoint
from llminfer.loading.hf_folder import HFFolderCheckpoint
from llminfer.loading.sharded import STRATEGY, ShardedCheckpoint
from llminfer.model.auto import build_model
from llminfer.model.base import CausalLM
from llminfer.ops import resolve_ops
from llminfer.parallel.sharding import ShardPlan, check_tp_size


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
            shutil.copy(checkpoint.path / QUANTIZATION_MANIFEST, staging / QUANTIZATION_MANIFEST)
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
    """One rank's slice of every tensor, recording each split in `strategy` on the way. The splits are the
    layers' own: the rank's network is built without storage (meta device) to ask each one."""
    network = rank_skeleton(plan)
    for name, tensor in checkpoint.named_tensors():
        if name == "lm_head.weight" and checkpoint.config.tie_word_embeddings:
            continue
        split = network.checkpoint_split(name)
        stored_dtype = str(dtype or tensor.dtype).replace("torch.", "")
        entry = strategy.setdefault(name, {"split": "replicated" if split.axis is None else split.axis,
                                           "shape": list(tensor.shape), "dtype": stored_dtype, "ranks": []})
        if split.axis is not None:
            entry["ranks"].append([list(r) for r in split.ranges])
        part = split.take(tensor)
        yield name, (part.to(dtype) if dtype is not None else part).clone()


def rank_skeleton(plan: ShardPlan) -> CausalLM:
    """Rank `plan.rank`'s network without storage (meta device): enough to ask each layer how it splits."""
    return build_model(plan.rank_config, device="meta", quantization=plan.quantization, ops=resolve_ops(None, "cpu"),
                       shard_plan=plan, collectives=_Offline())


class _Offline:
    """The collectives of a network that is only asked how its tensors split, never run."""

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        raise RuntimeError("an offline sharding skeleton does not run")

    all_gather_last = all_reduce


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
