"""Turn what the user typed (alias, file, folder, hub id) into a Checkpoint."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from llminfer.errors import ModelFormatError, ModelNotFoundError, TokenizerError
from llminfer.loading.checkpoint import Checkpoint
from llminfer.loading.default_models import ALIASES, fetch_alias
from llminfer.loading.gguf_file import GGUFCheckpoint
from llminfer.loading.hf_folder import HFFolderCheckpoint
from llminfer.loading.sharded import STRATEGY, ShardedCheckpoint
from llminfer.loading.synthetic import SYNTHETIC, synthetic_gguf
from llminfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def open_checkpoint(model: str) -> Checkpoint:
    if model in ALIASES:
        return GGUFCheckpoint(fetch_alias(model), name=model)
    if model in SYNTHETIC:
        return GGUFCheckpoint(synthetic_gguf(model), name=model)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix == ".gguf" or _starts_with_gguf_magic(path):
            return GGUFCheckpoint(path)
        raise ModelNotFoundError(f"{path}: expected a .gguf file or a model folder")
    if path.is_dir():
        if (path / "export.json").is_file():
            raise ModelFormatError(f"{path}: is an ONNX export; run it with "
                                   f"`llminfer-lite generate --model {path} ...` "
                                   "(or give the folder it was exported from)")
        if (path / STRATEGY).is_file():
            return ShardedCheckpoint(path)
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and not (path / "model_config.json").exists() and len(ggufs) == 1:
            return GGUFCheckpoint(ggufs[0])
        return HFFolderCheckpoint(path)
    if path.exists():
        raise ModelNotFoundError(f"{path}: not a readable file or folder")
    if model.startswith((".", "/", "~")) or model.endswith((".gguf", ".safetensors")):
        raise ModelNotFoundError(f"{path}: no such file or folder")
    if _HUB_ID.match(model):
        return HFFolderCheckpoint(_download_from_hub(model), name=model)
    raise ModelNotFoundError(
        f"model '{model}' not found: expected a path to a model folder or .gguf file, a hub id (org/name), "
        f"or an alias ({', '.join([*ALIASES, *SYNTHETIC])})"
    )


def _starts_with_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as exc:
        raise ModelNotFoundError(f"{path}: cannot be read ({exc.strerror})") from None


def _download_from_hub(repo_id: str) -> Path:
    """Snapshot of the files we read from a Hugging Face hub repo (needs network access)."""
    from huggingface_hub import snapshot_download

    logger.info("downloading %s from the Hugging Face hub", repo_id)
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo: all reported the same way
        raise ModelNotFoundError(f"model '{repo_id}': not a local path, and the hub download failed "
                                 f"({type(exc).__name__}: {exc})".splitlines()[0]) from None


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(model)`: the tokenizer of any model llminfer can open (alias, folder, GGUF
    file or hub id), without loading its weights."""

    @staticmethod
    def from_pretrained(model: str | Path) -> Tokenizer:
        tokenizer = open_checkpoint(str(model)).tokenizer()
        if tokenizer is None:
            raise TokenizerError(f"{model}: no tokenizer.json, tokenizer.model or GGUF vocabulary found")
        return tokenizer
