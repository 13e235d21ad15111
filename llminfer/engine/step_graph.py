"""Decode steps replayed from C++: the Python of a decode step (module calls, op dispatch, shape handling) costs
as much as its kernels on a small model. The first step in which every sequence decodes one token is recorded
for its batch size (ops/recording.py) into a graph of kernel calls on fixed tensors; later steps of that size
copy their inputs into those tensors and replay the graph, with no Python between the kernels.

What a step varies lives in the graph's input tensors (token ids, positions, cache slots, block tables,
lengths); the paged attention backend reads them through a plan fixed for the graph, with block tables as wide
as the longest context. A pass that the recorder refuses (an op implementation that cannot be replayed, e.g.
a reference attention reading Python lists) is said once, and steps of that size stay eager.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from llminfer.kv_cache import PagedKVCache
from llminfer.kv_cache.paged import DecodeBatch, PagedAttentionBackend, StepPlan
from llminfer.layers.attention import AttentionMetadata, ForwardContext
from llminfer.model.base import CausalLM
from llminfer.ops import cpu_kernels, recording

if TYPE_CHECKING:
    from llminfer.engine.model_runner import StepInputs  # the runner imports this module

logger = logging.getLogger(__name__)


class _DecodeGraph:
    """One batch size: its input tensors, the recorded graph, and the logits it writes."""

    def __init__(self, batch_size: int, max_blocks: int, device: torch.device) -> None:
        def longs(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        self.input_ids, self.positions = longs(batch_size), longs(batch_size)
        self.slot_blocks, self.slot_offsets = longs(batch_size), longs(batch_size)
        self.block_tables, self.context_lens = longs(batch_size, max_blocks), longs(batch_size)
        self.graph = cpu_kernels.kernels().StepGraph()
        self.logits: torch.Tensor | None = None

    def fill(self, step: StepInputs, block_size: int) -> None:
        self.input_ids.numpy()[:] = step.input_ids
        self.positions.numpy()[:] = step.positions
        slots = self.slot_blocks.numpy()
        slots[:] = step.slots
        self.slot_offsets.numpy()[:] = slots % block_size
        slots //= block_size
        self.block_tables.numpy()[:, : len(step.block_tables[0])] = step.block_tables
        self.context_lens.numpy()[:] = step.context_lens

    def plan(self) -> StepPlan:
        """What the attention layers read: these tensors, every sequence a single-token decode."""
        batch_size = len(self.input_ids)
        batch = DecodeBatch(self.block_tables, self.context_lens, num_shared=0)
        return StepPlan(self.slot_blocks, self.slot_offsets, list(range(batch_size)), torch.arange(batch_size), batch,
                        pure_decode=True)


class DecodeGraphs:
    """Records and replays pure-decode steps, one graph per batch size."""

    def __init__(self, model: CausalLM, cache: PagedKVCache, backend: PagedAttentionBackend,
                 max_model_len: int, max_batch_size: int) -> None:
        self.model, self.cache, self.backend = model, cache, backend
        self.max_batch_size = max_batch_size
        self.max_blocks = -(-max_model_len // cache.block_size)
        self.graphs: dict[int, _DecodeGraph | None] = {}  # None: the recorder refused this size
        self.replays = 0

    @staticmethod
    def usable(model: CausalLM, backend: object) -> str | None:
        """Why steps of this model cannot be replayed, or None."""
        if model.device.type != "cpu":
            return f"step graphs run on the CPU, not {model.device.type}"
        if type(backend) is not PagedAttentionBackend:  # a subclass's per-step Python would not run at replay
            return f"step graphs need the paged attention backend, not {type(backend).__name__}"
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            return "step graphs do not record collectives (tensor parallel)"
        return cpu_kernels.build_requirement()

    def run(self, step: StepInputs) -> torch.Tensor | None:
        """The logits [B, V] of a pure-decode step, replayed (or recorded now); None when the step must run eagerly.
        The tensor is the graph's own: the next step of this batch size overwrites it."""
        batch_size = len(step.input_ids)
        if step.all_positions or batch_size != len(step.context_lens) or batch_size > self.max_batch_size \
                or len(step.block_tables[0]) > self.max_blocks:
            return None
        if batch_size not in self.graphs:
            return self._record(batch_size, step)
        decode = self.graphs[batch_size]
        if decode is None:
            return None
        decode.fill(step, self.cache.block_size)
        decode.graph.replay()
        self.replays += 1
        return decode.logits

    def record_all(self, max_batch_size: int) -> int:
        """Record the decode step of every batch size up to max_batch_size now (a server does this before it
        reports ready, so no request waits for a recording). The dummy steps write into KV blocks 0..n-1, which
        no request holds yet. Returns how many were recorded."""
        from llminfer.engine.model_runner import StepInputs

        recorded = 0
        warmed = False
        for n in range(1, min(max_batch_size, self.max_batch_size, self.cache.num_blocks) + 1):
            if n in self.graphs:
                continue
            # sequence i in its own block i (a shared block would take the shared-prefix path, which a real
            # batch of unrelated requests does not)
            slots = [i * self.cache.block_size for i in range(n)]
            step = StepInputs([0] * n, [0] * n, slots, list(range(n + 1)), [1] * n, [[i] for i in range(n)], [],
                              False)
            with torch.inference_mode():
                if not warmed:  # one eager pass first: layers that prepare themselves on first use do it now
                    self._eager(step)
                    warmed = True
                self._record(n, step)
            recorded += self.graphs.get(n) is not None
        return recorded

    def _eager(self, step: StepInputs) -> None:
        device = self.model.device
        metadata = AttentionMetadata(step.query_start_loc, step.context_lens, torch.tensor(step.slots, device=device),
                                     torch.tensor(step.block_tables, device=device))
        hidden = self.model(torch.tensor(step.input_ids, device=device), torch.tensor(step.positions, device=device),
                            ForwardContext(self.backend, metadata))
        self.model.compute_logits(hidden)

    def _record(self, batch_size: int, step: StepInputs) -> torch.Tensor | None:
        decode = _DecodeGraph(batch_size, self.max_blocks, self.model.device)
        decode.fill(step, self.cache.block_size)
        metadata = AttentionMetadata(step.query_start_loc, step.context_lens, decode.slot_blocks,
                                     decode.block_tables)
        self.backend.use_plan(metadata, decode.plan())
        start = time.perf_counter()
        try:
            with recording.Recorder(decode.graph) as recorder:
                hidden = self.model(decode.input_ids, decode.positions, ForwardContext(self.backend, metadata))
                decode.logits = self.model.compute_logits(hidden)
        except recording.RecordingError as exc:
            # Nothing is lost: the eager step recomputes everything (its writes to the cache are the same).
            logger.info("decode steps of batch size %d stay eager: %s", batch_size, exc)
            self.graphs[batch_size] = None
            return None
        finally:
            self.backend.use_plan(None, None)
        logger.info("recorded the decode step of batch size %d: %d nodes, %.1f MiB of buffers, %.0f ms", batch_size,
                    len(decode.graph), recorder.held_bytes / 2**20, (time.perf_counter() - start) * 1e3)
        self.graphs[batch_size] = decode
        return decode.logits
