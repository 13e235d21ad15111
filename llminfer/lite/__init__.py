"""The lite runtime: an exported (ONNX) model on onnxruntime, numpy, tokenizers and jinja2 — no PyTorch."""

from llminfer.engine.sampling_params import SamplingParams
from llminfer.lite.model import LiteModel, LiteOutput

__all__ = ["LiteModel", "LiteOutput", "SamplingParams"]
