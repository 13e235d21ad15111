"""Logits -> next token for each sequence of a batch, each with its own SamplingParams.

Order, as in Hugging Face and vLLM: penalties on raw logits, then greedy argmax, or
temperature -> top-k / top-p / min-p filtering -> softmax -> draw with the request's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llminfer.engine.sampling_params import SamplingParams


@dataclass
class SamplingInput:
    """One row of the batch: its params, its history (for penalties), and its random generator."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    """logits: [V]. Repetition penalty over prompt+output; presence/frequency over output only."""
    logits = logits.clone()
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        seen = seen[seen < vocab]
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=vocab)[:vocab].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every token outside top-k, outside the top-p nucleus, or below min_p * max prob.

    logits: [B, V] (already temperature-scaled); top_k: [B] (0 = off), top_p: [B], min_p: [B].
    The most likely token always survives.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    remove = rank >= k[:, None]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better tokens
    remove |= mass_before >= top_p[:, None]
    remove |= probs < min_p[:, None] * probs[:, :1]
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplingInput]) -> list[int]:
        """logits: [B, V] float32 -> one token id per row."""
        logits = torch.stack([
            apply_penalties(logits[i], row.params, row.prompt_token_ids, row.output_token_ids)
            if row.params.has_penalties else logits[i]
            for i, row in enumerate(rows)
        ])
        chosen = logits.argmax(dim=-1).tolist()
        sampled = [i for i, row in enumerate(rows) if not row.params.is_greedy]
        if sampled:
            sub = logits[sampled]
            params = [rows[i].params for i in sampled]
            temperature = torch.tensor([p.temperature for p in params], device=sub.device)
            sub = sub / temperature[:, None]
            sub = filter_logits(
                sub,
                torch.tensor([max(p.top_k, 0) for p in params], device=sub.device),
                torch.tensor([p.top_p for p in params], device=sub.device),
                torch.tensor([p.min_p for p in params], device=sub.device),
            )
            probs = sub.softmax(dim=-1)
            for j, i in enumerate(sampled):
                chosen[i] = int(torch.multinomial(probs[j], 1, generator=rows[i].generator).item())
        return chosen
