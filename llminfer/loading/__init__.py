"""Weight sources: where checkpoints come from and how their tensors are read.

`open_checkpoint(name_or_path)` resolves an alias, a local path or a hub id to a `Checkpoint`
(HF safetensors folder, our converted folder, or GGUF file) that yields config, tensors and tokenizer.
Imported on first use, so that `llminfer.loading.default_models` needs no PyTorch.
"""

from typing import TYPE_CHECKING

from llminfer._lazy import lazy_attributes

_EXPORTS = {"Checkpoint": "llminfer.loading.checkpoint", "open_checkpoint": "llminfer.loading.resolve",
            "AutoTokenizer": "llminfer.loading.resolve"}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from llminfer.loading.checkpoint import Checkpoint  # noqa: F401 (re-exported)
    from llminfer.loading.resolve import AutoTokenizer, open_checkpoint  # noqa: F401 (re-exported)


__getattr__ = lazy_attributes(__name__, _EXPORTS)
