"""llminfer: a small, readable LLM inference engine for Llama-family models on PyTorch."""

from llminfer.config import EngineConfig, ModelConfig
from llminfer.engine import LLM, RequestOutput, SamplingParams
from llminfer.errors import LLMInferError
from llminfer.model import AutoModel
from llminfer.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["LLM", "AutoModel", "EngineConfig", "LLMInferError", "ModelConfig", "RequestOutput", "SamplingParams",
           "Tokenizer", "__version__"]
