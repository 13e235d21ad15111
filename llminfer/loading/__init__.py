"""Weight sources: where checkpoints come from and how their tensors are read.

`open_checkpoint(name_or_path)` resolves an alias, a local path or a hub id to a `Checkpoint`
(HF safetensors folder, our converted folder, or GGUF file) that yields config, tensors and tokenizer.
Imported on first use, so that `llminfer.loading.default_models` needs no PyTorch.
"""

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {"Checkpoint": "llminfer.loading.checkpoint", "open_checkpoint": "llminfer.loading.resolve"}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from llminfer.loading.checkpoint import Checkpoint
    from llminfer.loading.resolve import open_checkpoint


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llminfer.loading' has no attribute {name!r}")
