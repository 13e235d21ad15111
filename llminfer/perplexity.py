"""`llminfer perplexity`: how well a model predicts a text, over fixed-length windows.

The default text is the English documentation that ships with every Python (`pydoc_data.topics`), so a figure
measured here can be reproduced anywhere. Each window of `context_len` tokens is prefilled once through the
engine's own paged-attention path (so the KV cache format under test is the one scored), and every token but
the window's first is scored: perplexity = exp(mean negative log-likelihood).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from llminfer.engine.llm_engine import LLMEngine, exact_kv_budget
from llminfer.engine.sampling_params import SamplingParams
from llminfer.errors import InvalidPromptError


def default_text() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[name] for name in sorted(topics))


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens_scored: int
    windows: int
    context_len: int
    seconds: float


def window_logits(model, windows: list[list[int]], engine_config=None,
                  engine: LLMEngine | None = None) -> Iterator[torch.Tensor]:
    """Prefill each window (token ids) on its own through the engine's paged path; yields its logits [L, V].
    By default a private engine sized for one window; or a given one (e.g. an LLM's, under tensor parallelism),
    which must have prefix caching off and room for a whole window in one step."""
    from llminfer.config import EngineConfig

    if engine is None:
        longest = max(len(w) for w in windows)
        # Prefix caching off: every window is computed, never looked up.
        config = replace(engine_config or EngineConfig(), enable_prefix_caching=False,
                         max_num_batched_tokens=longest, max_model_len=None)
        engine = LLMEngine(model, None, exact_kv_budget(config, model, longest + 1, 1))
    for window in windows:
        request = engine.add_request(window, SamplingParams(max_tokens=1, ignore_eos=True))
        batch = engine.scheduler.schedule()
        logits = engine.runner.compute_logits(batch, all_positions=True)  # [len(window), V]
        engine.abort(request.group_id)
        yield logits


def perplexity(model, token_ids: list[int], context_len: int = 512, engine_config=None,
               progress: Callable[[int, int], None] | None = None,
               engine: LLMEngine | None = None) -> PerplexityResult:
    """Score token_ids in consecutive windows of context_len tokens (a last window shorter than 2 is dropped)."""
    if context_len < 2:
        raise InvalidPromptError(f"context_len must be at least 2, got {context_len}")
    windows = [token_ids[i:i + context_len] for i in range(0, len(token_ids), context_len)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise InvalidPromptError(f"text has {len(token_ids)} tokens: nothing to score (need at least 2)")
    start = time.perf_counter()
    total_nll, scored = 0.0, 0
    for index, (window, logits) in enumerate(zip(windows, window_logits(model, windows, engine_config, engine))):
        targets = torch.tensor(window[1:], device=logits.device)
        logprobs = logits[:-1].double().log_softmax(dim=-1)
        total_nll -= float(logprobs.gather(1, targets[:, None]).sum())
        scored += len(window) - 1
        if progress is not None:
            progress(index + 1, len(windows))
    mean = total_nll / scored
    return PerplexityResult(math.exp(mean), mean, scored, len(windows), context_len, time.perf_counter() - start)


def read_text_file(path: str, what: str) -> str:
    """A UTF-8 text file given on the command line, or a one-line error naming it."""
    from pathlib import Path

    from llminfer.errors import ModelNotFoundError

    file = Path(path)
    if not file.is_file():
        raise ModelNotFoundError(f"{file}: {what} not found")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidPromptError(f"{file}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
