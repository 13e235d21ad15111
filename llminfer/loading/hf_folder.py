"""Hugging Face model folders (config.json + safetensors, sharded or not) and our converted folders."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from llminfer.config import QUANTIZATION_MANIFEST, ModelConfig, QuantizationConfig
from llminfer.errors import ModelFormatError
from llminfer.files import read_json_object
from llminfer.loading.checkpoint import Checkpoint

if TYPE_CHECKING:
    from llminfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

OUR_CONFIG = "model_config.json"  # written by `llminfer convert`, ModelConfig fields
MANIFEST = "manifest.json"
_SAFETENSORS_DTYPES = {"I8": "int8", "U8": "uint8", "I32": "int32", "F32": "float32", "F16": "float16",
                       "BF16": "bfloat16", "F64": "float64", "I64": "int64"}


class HFFolderCheckpoint(Checkpoint):
    format = "hf-safetensors"

    def __init__(self, path: Path, name: str | None = None) -> None:
        super().__init__(name or str(path))
        self.path = path
        if (path / MANIFEST).is_file():
            self.format = "llminfer"
            self._check_manifest()
        self._files = self._weight_files()

    def _check_manifest(self) -> None:
        # Sizes are cheap to compare and catch truncated copies; sha256 is there for `sha256sum -c` users.
        manifest = read_json_object(self.path / MANIFEST)
        for file_name, entry in (manifest.get("files") or {}).items():
            file = self.path / file_name
            if not file.is_file():
                raise ModelFormatError(f"{file}: listed in {MANIFEST} but missing")
            if file.stat().st_size != entry.get("bytes"):
                raise ModelFormatError(f"{file}: {file.stat().st_size} bytes, {MANIFEST} says {entry.get('bytes')} "
                                       "(truncated or modified copy)")

    def model_config(self) -> ModelConfig:
        ours, hf = self.path / OUR_CONFIG, self.path / "config.json"
        if ours.is_file():
            return ModelConfig.from_dict(read_json_object(ours), str(ours))
        if not hf.is_file():
            raise ModelFormatError(f"{self.path}: no config.json (expected a Hugging Face model folder)")
        config = ModelConfig.from_hf_dict(read_json_object(hf), str(hf))
        generation = self.path / "generation_config.json"
        if generation.is_file():  # chat models list their end-of-turn ids here (Llama 3: <|eot_id|>)
            eos = read_json_object(generation).get("eos_token_id")
            extra = eos if isinstance(eos, list) else [] if eos is None else [eos]
            config = replace(config, eos_token_id=tuple(dict.fromkeys([*config.eos_token_id, *extra])))
        return config

    def sampling_defaults(self) -> dict[str, float | int]:
        from llminfer.loading.sampling_defaults import read_generation_config

        return read_generation_config(self.path)

    def _weight_files(self) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.path / index_name
            if index.is_file():
                weight_map = read_json_object(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ModelFormatError(f"{index}: missing 'weight_map'")
                files = [self.path / f for f in sorted(set(weight_map.values()))]
                for file in files:
                    if not file.is_file():
                        raise ModelFormatError(f"{index}: lists shard '{file.name}', which is missing")
                return files
        files = sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("pytorch_model*.bin"))
        if not files:
            raise ModelFormatError(f"{self.path}: no *.safetensors (or pytorch_model*.bin) weight files")
        return files

    def tensor_names(self) -> list[str]:
        return [name for _, name in self._locations()]

    def _locations(self) -> list[tuple[Path, str]]:
        locations = []
        for file in self._files:
            if file.suffix == ".safetensors":
                with _open_safetensors(file) as f:
                    locations.extend((file, name) for name in f.keys())
            else:
                locations.extend((file, name) for name in _load_bin(file))
        return locations

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        total = len(self.tensor_names())
        with tqdm(total=total, desc=f"Loading {self.path.name}", unit="tensor", leave=False, disable=None) as bar:
            for file in self._files:
                if file.suffix == ".safetensors":
                    with _open_safetensors(file) as f:
                        for name in f.keys():
                            yield name, _read_tensor(f, file, name)
                            bar.update()
                else:
                    for name, tensor in _load_bin(file).items():
                        yield name, tensor
                        bar.update()

    def quantization_config(self) -> QuantizationConfig | None:
        if not (self.path / QUANTIZATION_MANIFEST).is_file():
            return None
        return read_quantization_manifest(self.path, self.tensor_shapes() or {})

    def tensor_shapes(self) -> dict[str, tuple[str, list[int]]] | None:
        """name -> (torch dtype name, shape), from the safetensors headers (no tensor is read)."""
        shapes = {}
        for file in self._files:
            if file.suffix != ".safetensors":
                return None
            with _open_safetensors(file) as f:
                for name in f.keys():
                    tensor_slice = f.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype(), tensor_slice.get_dtype())
                    shapes[name] = (dtype, list(tensor_slice.get_shape()))
        return shapes

    def tokenizer(self) -> "Tokenizer | None":
        from llminfer.tokenizer import Tokenizer

        return Tokenizer.from_folder(self.path) if Tokenizer.folder_has_tokenizer(self.path) else None


def _open_safetensors(file: Path) -> Any:
    try:
        return safe_open(str(file), framework="pt")  # memory-mapped: tensors are read on access
    except (SafetensorError, OSError) as exc:
        raise ModelFormatError(f"{file}: not a readable safetensors file ({exc})") from None


def _read_tensor(handle: Any, file: Path, name: str) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ModelFormatError(f"{file}: tensor '{name}' cannot be read ({exc})") from None


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    # Pickle-based checkpoints: only tensors and plain containers are allowed, never arbitrary objects.
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ModelFormatError(f"{file}: not a loadable PyTorch weights file ({exc})".splitlines()[0]) from None


def read_quantization_manifest(folder: Path, tensor_shapes: dict[str, tuple[str, list[int]]]
                               ) -> QuantizationConfig:
    """Parse quantization.json and check it against the tensors actually in the folder."""
    file = folder / QUANTIZATION_MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelFormatError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("quantization"), dict):
        raise ModelFormatError(f"{file}: missing the 'quantization' object")
    config = QuantizationConfig.from_dict(manifest["quantization"], str(file))
    listed = manifest.get("quantized_tensors")
    if not isinstance(listed, dict) or not listed:
        raise ModelFormatError(f"{file}: missing the 'quantized_tensors' listing")
    for name, entry in listed.items():
        if name not in tensor_shapes:
            raise ModelFormatError(f"{file}: lists tensor '{name}', which is not in the weight files")
        dtype, shape = tensor_shapes[name]
        if [dtype, list(shape)] != [entry.get("dtype"), entry.get("shape")]:
            raise ModelFormatError(f"{file}: tensor '{name}' is {dtype} {list(shape)} in the weight files, "
                                   f"the manifest says {entry.get('dtype')} {entry.get('shape')}")
    unlisted = [n for n in tensor_shapes if n.endswith((".qweight", ".scales", ".zeros", ".smooth"))
                and n not in listed]
    if unlisted:
        raise ModelFormatError(f"{file}: tensor '{unlisted[0]}' is in the weight files but not in the manifest")
    return config
