"""Runs the network on a scheduled batch: flat inputs + paged attention metadata -> logits -> sampler -> a
plain SamplerOutput. It never writes into requests; the scheduler does, from that output."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llminfer.engine.sampler import Sampler, SamplerOutput, SamplingInput, scored_logprobs
from llminfer.engine.scheduler import ScheduledBatch
from llminfer.engine.step_graph import DecodeGraphs
from llminfer.engine.structured import MaskWorker
from llminfer.kv_cache import PagedKVCache
from llminfer.layers.attention import AttentionBackend, AttentionMetadata, ForwardContext
from llminfer.model.base import CausalLM


@dataclass
class StepInputs:
    """One forward pass, as plain data: what the runner needs to run the model (and what tensor-parallel
    rank 0 sends to the other ranks each step)."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    query_start_loc: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]  # padded to the widest
    block_copies: list[tuple[int, int]]
    all_positions: bool  # logits at every new token (scoring) instead of each sequence's last
    extra_logit_rows: list[int] = field(default_factory=list)  # flat token rows whose logits follow the last rows'


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, backend: AttentionBackend,
                 step_graphs: DecodeGraphs | None = None, masks: MaskWorker | None = None) -> None:
        self.model, self.cache, self.backend = model, cache, backend
        self.step_graphs = step_graphs  # pure-decode steps replayed from C++ (None: every step runs eagerly)
        self.device = model.device
        self.sampler = Sampler()
        self.masks = masks or MaskWorker(model.config.vocab_size)  # structured requests' allowed tokens

    def execute_model(self, batch: ScheduledBatch) -> SamplerOutput:
        """Run the step and sample a token for each of the batch's samples (in `batch.samples` order). Requests
        are only read: the scheduler updates them from this output. Structured requests' token masks are
        computed on a worker thread while the model runs."""
        pending_masks = self.masks.start([r.grammar for _, r in batch.samples])
        step = self.prepare(batch)
        scored = self._scored_prompt_rows(batch, step)
        step.extra_logit_rows = [row for _, rows, _ in scored for row in rows]
        logits = self.execute(step)
        allowed = self.masks.finish(pending_masks)
        prompt_logprobs = []
        offset = len(batch.requests)
        for request, rows, targets in scored:
            prompt_logprobs.append((request, scored_logprobs(logits[offset:offset + len(rows)], targets,
                                                             request.params.prompt_logprobs)))
            offset += len(rows)
        if not batch.samples:
            return SamplerOutput([], [], [], prompt_logprobs)
        rows = [row for row, _ in batch.samples]
        inputs = [SamplingInput(r.params, r.prompt_token_ids, r.output_token_ids, r.generator)
                  for _, r in batch.samples]
        output = self.sampler(logits[rows], inputs, allowed)
        output.prompt_logprobs = prompt_logprobs
        return output

    @staticmethod
    def _scored_prompt_rows(batch: ScheduledBatch, step: StepInputs) -> list[tuple[object, list[int], list[int]]]:
        """For requests scoring their prompt: (request, the flat rows whose logits predict a prompt token not
        yet scored, those tokens). Row p predicts token p + 1; after a preemption the prompt is recomputed, but
        what was scored before is not scored again."""
        scored = []
        for i, (request, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            if request.params.prompt_logprobs is None:
                continue
            first = request.num_computed_tokens
            start = max(first, len(request.prompt_logprobs))
            end = min(first + n, len(request.prompt_token_ids) - 1)
            if start < end:
                base = step.query_start_loc[i] - first
                scored.append((request, [base + p for p in range(start, end)],
                               request.prompt_token_ids[start + 1:end + 1]))
        return scored

    def compute_logits(self, batch: ScheduledBatch, all_positions: bool = False) -> torch.Tensor:
        """Logits [B, V] at the last new token of each request (or [T, V] at every new token, for scoring);
        their keys/values land in the cache."""
        return self.execute(self.prepare(batch, all_positions))

    def prepare(self, batch: ScheduledBatch, all_positions: bool = False) -> StepInputs:
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
        tables = [t + [0] * (widest - len(t)) for t in batch.block_tables]
        return StepInputs(input_ids, positions, slots, starts, context_lens, tables, list(batch.block_copies),
                          all_positions)

    @torch.inference_mode()
    def execute(self, step: StepInputs) -> torch.Tensor:
        self.cache.copy_blocks(step.block_copies)
        if self.step_graphs is not None and not step.extra_logit_rows:
            logits = self.step_graphs.run(step)
            if logits is not None:
                return logits
        device = self.device
        metadata = AttentionMetadata(step.query_start_loc, step.context_lens, torch.tensor(step.slots, device=device),
                                     torch.tensor(step.block_tables, device=device))
        hidden = self.model(torch.tensor(step.input_ids, device=device), torch.tensor(step.positions, device=device),
                            ForwardContext(self.backend, metadata))
        if step.all_positions:
            return self.model.compute_logits(hidden)
        last_rows = torch.tensor([s - 1 for s in step.query_start_loc[1:]] + step.extra_logit_rows, device=device)
        return self.model.compute_logits(hidden[last_rows])
