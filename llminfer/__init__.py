"""llminfer: a small, readable LLM inference engine for Llama-family models on PyTorch.

The public names are imported on first use, so that `llminfer.lite` (onnxruntime, no PyTorch) can live in the
same package without importing torch.
"""

from typing import TYPE_CHECKING

from llminfer._lazy import lazy_attributes

__version__ = "0.1.0"

_EXPORTS = {"LLM": "llminfer.engine.llm", "RequestOutput": "llminfer.engine.outputs",
            "SamplingParams": "llminfer.engine.sampling_params", "EngineConfig": "llminfer.config",
            "ModelConfig": "llminfer.config", "LLMInferError": "llminfer.errors", "AutoModel": "llminfer.model",
            "Tokenizer": "llminfer.tokenizer", "AutoTokenizer": "llminfer.loading", "generate": "llminfer.engine"}
__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from llminfer.config import EngineConfig, ModelConfig  # noqa: F401 (re-exported)
    from llminfer.engine import LLM, RequestOutput, SamplingParams, generate  # noqa: F401 (re-exported)
    from llminfer.errors import LLMInferError  # noqa: F401 (re-exported)
    from llminfer.loading import AutoTokenizer  # noqa: F401 (re-exported)
    from llminfer.model import AutoModel  # noqa: F401 (re-exported)
    from llminfer.tokenizer import Tokenizer  # noqa: F401 (re-exported)


__getattr__ = lazy_attributes(__name__, _EXPORTS)
