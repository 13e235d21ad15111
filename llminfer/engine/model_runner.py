"""Runs the network on a scheduled batch: flat inputs + paged attention metadata -> logits -> sampler."""

from __future__ import annotations

import torch

from llminfer.engine.sampler import Sampler, SamplerOutput, SamplingInput
from llminfer.engine.scheduler import ScheduledBatch
from llminfer.kv_cache import PagedKVCache
from llminfer.layers.attention import AttentionBackend, AttentionMetadata, ForwardContext
from llminfer.model.base import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, backend: AttentionBackend) -> None:
        self.model, self.cache, self.backend = model, cache, backend
        self.device = model.device
        self.sampler = Sampler()

    @torch.inference_mode()
    def compute_logits(self, batch: ScheduledBatch, all_positions: bool = False) -> torch.Tensor:
        """Logits [B, V] at the last new token of each request (or [T, V] at every new token, for scoring);
        their keys/values land in the cache."""
        self.cache.copy_blocks(batch.block_copies)
        block_size = self.cache.block_size
        input_ids, positions, slots, starts, context_lens = [], [], [], [0], []
        for request, n_new, table in zip(batch.requests, batch.num_new_tokens, batch.block_tables):
            first = request.num_computed_tokens
            input_ids.extend(request.token_ids_between(first, first + n_new))
            positions.extend(range(first, first + n_new))
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(first, first + n_new))
            starts.append(starts[-1] + n_new)
            context_lens.append(first + n_new)
        widest = max(len(t) for t in batch.block_tables)
        tables = torch.tensor([t + [0] * (widest - len(t)) for t in batch.block_tables], device=self.device)
        metadata = AttentionMetadata(starts, context_lens, torch.tensor(slots, device=self.device), tables)
        hidden = self.model(torch.tensor(input_ids, device=self.device), torch.tensor(positions, device=self.device),
                            ForwardContext(self.backend, metadata))
        for request, n_new in zip(batch.requests, batch.num_new_tokens):
            request.num_computed_tokens += n_new
        if all_positions:
            return self.model.compute_logits(hidden)
        last_rows = torch.tensor([s - 1 for s in starts[1:]], device=self.device)
        return self.model.compute_logits(hidden[last_rows])

    def sample(self, logits: torch.Tensor, rows: list[SamplingInput]) -> SamplerOutput:
        return self.sampler(logits, rows)
