"""Weight sources: where checkpoints come from and how their tensors are read.

`open_checkpoint(name_or_path)` resolves an alias, a local path or a hub id to a `Checkpoint`
(HF safetensors folder, our converted folder, or GGUF file) that yields config, tensors and tokenizer.
"""

from llminfer.loading.checkpoint import Checkpoint
from llminfer.loading.resolve import open_checkpoint

__all__ = ["Checkpoint", "open_checkpoint"]
