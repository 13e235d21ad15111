"""`llminfer convert`: any readable checkpoint -> our folder format.

Layout: model_config.json (ModelConfig), config.json (the HF equivalent), safetensors shards with
HF tensor names (+ index), tokenizer.json / tokenizer_config.json, and manifest.json listing every
file with its size and sha256. Written into a temporary folder beside the destination and renamed
into place at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import save_file

from llminfer.config import DTYPES
from llminfer.errors import ConfigError, ModelFormatError
from llminfer.files import file_sha256
from llminfer.loading.hf_folder import MANIFEST, OUR_CONFIG
from llminfer.loading.resolve import open_checkpoint

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def convert_checkpoint(source: str, destination: str | Path, dtype: str = "bfloat16",
                       max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False) -> Path:
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype '{dtype}' is not supported (expected one of {', '.join(DTYPES)})")
    destination = Path(destination)
    checkpoint = open_checkpoint(source)
    if checkpoint.quantization_config() is not None:
        raise ConfigError(f"{source}: is a quantized checkpoint ({checkpoint.quantization_config().describe()}); "
                          "convert reads float checkpoints")
    config = replace(checkpoint.config, torch_dtype=dtype)
    tokenizer = checkpoint.tokenizer()
    with staged_folder(destination, overwrite) as staging:
        tensors = ((name, tensor.to(DTYPES[dtype])) for name, tensor in checkpoint.named_tensors()
                   if not (name == "lm_head.weight" and config.tie_word_embeddings))
        shards = write_shards(tensors, staging, max_shard_bytes, checkpoint.name)
        write_model_files(staging, config, tokenizer, checkpoint.sampling_defaults())
        write_manifest(staging, {"source": source, "source_format": checkpoint.format, "dtype": dtype,
                                 "num_tensors": len(shards)})
    return destination


def check_destination(destination: Path, overwrite: bool) -> None:
    """Refuse a non-empty destination unless told to replace it (called before long work, too)."""
    if destination.exists() and not (destination.is_dir() and not any(destination.iterdir())) and not overwrite:
        raise ConfigError(f"{destination}: already exists and is not empty (choose another path or pass --overwrite)")


@contextmanager
def staged_folder(destination: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside `destination`, renamed into place only when the block succeeds."""
    destination = Path(destination)
    check_destination(destination, overwrite)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the model folder should not be
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_model_files(folder: Path, config, tokenizer, sampling_defaults: dict | None = None) -> None:
    """Our config, its Hugging Face equivalent, the tokenizer files, and the model's sampling defaults."""
    from llminfer.loading.sampling_defaults import as_generation_config

    (folder / OUR_CONFIG).write_text(json.dumps(config.to_dict(), indent=2))
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    if sampling_defaults:
        (folder / "generation_config.json").write_text(json.dumps(as_generation_config(sampling_defaults), indent=2))
    if tokenizer is not None:
        tokenizer.save(folder)


def write_shards(tensors: Iterable[tuple[str, torch.Tensor]], folder: Path, max_shard_bytes: int,
                 source_name: str) -> dict[str, str]:
    """Stream tensors into shards of at most max_shard_bytes; returns the weight map (tensor -> file)."""
    parts: list[dict[str, torch.Tensor]] = [{}]
    part_bytes = 0
    part_names: list[str] = []
    weight_map: dict[str, str] = {}
    for name, tensor in tensors:
        tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if parts[-1] and part_bytes + nbytes > max_shard_bytes:
            part_names.append(_save_part(parts.pop(), folder, len(part_names), weight_map))
            parts.append({})
            part_bytes = 0
        parts[-1][name] = tensor
        part_bytes += nbytes
    if parts[-1]:
        part_names.append(_save_part(parts.pop(), folder, len(part_names), weight_map))
    if not part_names:
        raise ModelFormatError(f"{source_name}: no tensors to write")
    # Final names need the shard count, known only now.
    if len(part_names) == 1:
        final = {part_names[0]: "model.safetensors"}
    else:
        final = {p: f"model-{i + 1:05d}-of-{len(part_names):05d}.safetensors" for i, p in enumerate(part_names)}
    for old, new in final.items():
        (folder / old).rename(folder / new)
    weight_map = {tensor_name: final[part] for tensor_name, part in sorted(weight_map.items())}
    if len(part_names) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return weight_map


def _save_part(part: dict[str, torch.Tensor], folder: Path, index: int, weight_map: dict[str, str]) -> str:
    name = f"part-{index + 1:05d}.safetensors"
    save_file(part, str(folder / name), metadata={"format": "pt"})
    weight_map.update({tensor_name: name for tensor_name in part})
    return name


def write_manifest(folder: Path, fields: dict) -> None:
    """manifest.json: every file with its size and sha256, plus what produced the folder."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"format": "llminfer", "format_version": FORMAT_VERSION, **fields,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    total = sum(f["bytes"] for f in files.values())
    print(f"llminfer: wrote {len(files)} files ({total / 1e6:.1f} MB)", file=sys.stderr)
