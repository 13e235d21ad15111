"""Requests in, tokens out: sampling params, requests, scheduler, model runner, sampler, engine.

Imported on first use: `SamplingParams` needs no PyTorch, and the lite runtime uses it.
"""

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {"LLM": "llminfer.engine.llm", "RequestOutput": "llminfer.engine.outputs",
            "SamplingParams": "llminfer.engine.sampling_params"}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from llminfer.engine.llm import LLM
    from llminfer.engine.outputs import RequestOutput
    from llminfer.engine.sampling_params import SamplingParams


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llminfer.engine' has no attribute {name!r}")
