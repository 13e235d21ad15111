"""The network: model classes by architecture, and AutoModel to build and load them."""

from llminfer.model.auto import AutoModel, build_model
from llminfer.model.base import CausalLM

__all__ = ["AutoModel", "CausalLM", "build_model"]
