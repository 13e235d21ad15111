"""llminfer: a small, readable LLM inference engine for Llama-family models on PyTorch.

The public names are imported on first use, so that `llminfer.lite` (onnxruntime, no PyTorch) can live in the
same package without importing torch.
"""

import os
import sys
from typing import TYPE_CHECKING

from llminfer._lazy import lazy_attributes

# Torch's OpenMP threads (libgomp) spin ~300,000 times at the end of every parallel region before they sleep. A
# spinning thread that loses its core to another job stalls every later region until the scheduler gives the core
# back: measured, a busy process on one of 2 cores cut A16W4 decode from 197 to 18 tok/s. At 1000 spins they sleep
# soon and, woken, preempt the other job: 70 tok/s under the same load, ~195 unloaded (docs/PERFORMANCE.md). It
# must be set before libgomp loads (torch's import); a value the user set is kept, and peers that bench runs in a
# child process (llama.cpp) get the environment as it was.
SPIN_COUNT = "1000"
spin_count_defaulted = ("torch" not in sys.modules and "GOMP_SPINCOUNT" not in os.environ
                        and os.environ.get("LLMINFER_OMP_DEFAULTS") != "keep")
if spin_count_defaulted:
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT

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
