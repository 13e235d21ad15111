"""Runs the network on a scheduled batch: builds flat inputs and attention metadata, samples."""

from __future__ import annotations

import torch

from llminfer.engine.sampler import Sampler, SamplingInput
from llminfer.engine.scheduler import ScheduledBatch
from llminfer.layers.attention import AttentionBackend, AttentionMetadata, ForwardContext
from llminfer.model.base import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, backend: AttentionBackend) -> None:
        self.model = model
        self.backend = backend
        self.device = model.device
        self.sampler = Sampler()

    @torch.inference_mode()
    def compute_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [B, V] at the last new token of each request; the cache is extended in passing."""
        input_ids, positions, starts, context_lens = [], [], [0], []
        for request, n_new in zip(batch.requests, batch.num_new_tokens):
            first = request.num_computed_tokens
            input_ids.extend(request.token_ids_between(first, first + n_new))
            positions.extend(range(first, first + n_new))
            starts.append(starts[-1] + n_new)
            context_lens.append(first + n_new)
        metadata = AttentionMetadata(starts, context_lens, [r.cache_slot for r in batch.requests])
        ctx = ForwardContext(self.backend, metadata)
        hidden = self.model(torch.tensor(input_ids, device=self.device), torch.tensor(positions, device=self.device), ctx)
        last_rows = torch.tensor([s - 1 for s in starts[1:]], device=self.device)
        for request, n_new in zip(batch.requests, batch.num_new_tokens):
            request.num_computed_tokens += n_new
        return self.model.compute_logits(hidden[last_rows])

    def step(self, batch: ScheduledBatch) -> list[int]:
        logits = self.compute_logits(batch)
        rows = [SamplingInput(r.params, r.prompt_token_ids, r.output_token_ids, r.generator) for r in batch.requests]
        return self.sampler(logits, rows)
