"""llminfer: a small, readable LLM inference engine for Llama-family models on PyTorch.

The public names are imported on first use, so that `llminfer.lite` (onnxruntime, no PyTorch) can live in the
same package without importing torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {"LLM": "llminfer.engine.llm", "RequestOutput": "llminfer.engine.outputs",
            "SamplingParams": "llminfer.engine.sampling_params", "EngineConfig": "llminfer.config",
            "ModelConfig": "llminfer.config", "LLMInferError": "llminfer.errors", "AutoModel": "llminfer.model",
            "Tokenizer": "llminfer.tokenizer"}
__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from llminfer.config import EngineConfig, ModelConfig
    from llminfer.engine import LLM, RequestOutput, SamplingParams
    from llminfer.errors import LLMInferError
    from llminfer.model import AutoModel
    from llminfer.tokenizer import Tokenizer


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llminfer' has no attribute {name!r}")
