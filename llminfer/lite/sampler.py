"""The engine's sampling rules in numpy: penalties on raw logits, then greedy argmax, or temperature ->
top-k / top-p / min-p filtering -> softmax -> a draw from the request's own random generator.

Same order and the same meaning of every SamplingParams field as llminfer.engine.sampler; the random streams
differ (numpy's PCG64, not torch's), so a seed reproduces lite runs, not engine runs.
"""

from __future__ import annotations

import numpy as np

from llminfer.engine.sampling_params import SamplingParams
from llminfer.errors import NON_FINITE_LOGITS, RequestFailedError

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def apply_penalties(logits: np.ndarray, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> np.ndarray:
    """logits: [V]. Repetition penalty over prompt+output; presence/frequency over output only."""
    logits = logits.copy()
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = np.array(sorted(i for i in set(prompt_ids) | set(output_ids) if 0 <= i < vocab), dtype=np.int64)
        values = logits[seen]
        logits[seen] = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = np.bincount(np.asarray(output_ids), minlength=vocab)[:vocab].astype(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits


def filter_logits(logits: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """-inf for every token outside top-k, outside the top-p nucleus, or below min_p x the best probability;
    the most likely token always survives. logits: [V], already divided by the temperature."""
    order = np.argsort(-logits, kind="stable")
    ranked = logits[order]
    probs = _softmax(ranked)
    remove = np.arange(ranked.shape[0]) >= (top_k if top_k > 0 else ranked.shape[0])
    if top_p < 1:  # top_p 1 is off, whatever the rounding of the cumulative sum
        remove |= (np.cumsum(probs) - probs) >= top_p  # probability of the strictly better tokens
    remove |= probs < min_p * probs[0]
    remove[0] = False
    filtered = np.empty_like(logits)
    filtered[order] = np.where(remove, -np.inf, ranked)
    return filtered


def sample(logits: np.ndarray, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
           rng: np.random.Generator) -> int:
    logits = logits.astype(np.float32)
    if np.isnan(logits).any() or (logits == np.inf).any() or not (logits > -np.inf).any():
        raise RequestFailedError(NON_FINITE_LOGITS)
    with np.errstate(over="ignore"):  # overflow is clipped, as the engine does: finite logits stay finite
        if params.has_penalties:
            logits = np.clip(apply_penalties(logits, params, prompt_ids, output_ids), -_FLOAT32_MAX, _FLOAT32_MAX)
        if params.is_greedy:
            return int(np.argmax(logits))
        scaled = np.clip(logits / params.temperature, -_FLOAT32_MAX, _FLOAT32_MAX)
        logits = filter_logits(scaled, max(params.top_k, 0), params.top_p, params.min_p)
        probs = _softmax(logits.astype(np.float64))
    return int(rng.choice(probs.shape[0], p=probs / probs.sum()))


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - np.max(x))
    return shifted / shifted.sum()
