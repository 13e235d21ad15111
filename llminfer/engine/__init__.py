"""Requests in, tokens out: sampling params, requests, scheduler, model runner, sampler, engine.

Imported on first use: `SamplingParams` needs no PyTorch, and the lite runtime uses it.
"""

from typing import TYPE_CHECKING

from llminfer._lazy import lazy_attributes

_EXPORTS = {"LLM": "llminfer.engine.llm", "RequestOutput": "llminfer.engine.outputs",
            "SamplingParams": "llminfer.engine.sampling_params", "generate": "llminfer.engine.generation"}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from llminfer.engine.generation import generate  # noqa: F401 (re-exported)
    from llminfer.engine.llm import LLM  # noqa: F401 (re-exported)
    from llminfer.engine.outputs import RequestOutput  # noqa: F401 (re-exported)
    from llminfer.engine.sampling_params import SamplingParams  # noqa: F401 (re-exported)


__getattr__ = lazy_attributes(__name__, _EXPORTS)
