"""Hugging Face-style generation on top of the engine: `generate(model, input_ids, max_new_tokens=32, ...)`.

A function of the engine rather than a method of the network: the model package sits below the engine and
never imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from llminfer.config import EngineConfig
from llminfer.engine.llm_engine import LLMEngine, exact_kv_budget
from llminfer.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llminfer.model.base import CausalLM


def generate(model: "CausalLM", input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
             max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
             eos_token_id: int | Sequence[int] | None = None) -> torch.Tensor | list[list[int]]:
    """Prompt + generated ids for each input row (greedy unless do_sample).

    A tensor input gives a tensor back ([B, S] rows padded with the first EOS id when lengths differ); lists
    give lists.
    """
    as_tensor = isinstance(input_ids, torch.Tensor)
    rows = input_ids.tolist() if as_tensor else list(input_ids)
    if rows and isinstance(rows[0], int):
        rows = [rows]
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                            top_k=top_k if do_sample else 0, top_p=top_p if do_sample else 1.0,
                            min_p=min_p if do_sample else 0.0, repetition_penalty=repetition_penalty, seed=seed)
    extra = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    config = EngineConfig(dtype=str(model.dtype).replace("torch.", ""), device=str(model.device))
    longest = max(len(row) for row in rows) + max_new_tokens
    engine = LLMEngine(model, model.tokenizer, exact_kv_budget(config, model, longest, len(rows)), extra)
    requests = [engine.add_request(row, params) for row in rows]
    engine.run_to_completion()
    sequences = [r.all_token_ids for r in requests]
    if not as_tensor:
        return sequences
    pad = min(engine.eos_token_ids) if engine.eos_token_ids else 0
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=input_ids.device)
