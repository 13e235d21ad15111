"""Continuous batching: each step, pick which requests advance and by how many tokens, and afterwards update
them from what the model runner returned. The scheduler is the only writer of request state.

Thinks in tokens, not phases: a request has `num_computed_tokens` (in the KV cache) against
`num_tokens` (prompt + output). Each step it gets up to the difference, within a token budget,
so a long prompt is prefilled in chunks while running requests keep decoding. Running requests
are served first (oldest first), then waiting ones in the order of the waiting queue's policy. When the
KV pool runs dry the newest running request is preempted: its blocks are freed and it is recomputed later.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

from llminfer.engine.request import Request, RequestStatus
from llminfer.engine.sampler import SamplerOutput
from llminfer.errors import ConfigError
from llminfer.kv_cache import KVCacheManager

logger = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    """One step, as the scheduler decided it (the scheduler -> runner boundary; the runner only reads it)."""

    requests: list[Request]  # those that compute tokens this step, in batch (row) order
    num_new_tokens: list[int]  # how many tokens each computes, from its num_computed_tokens on
    block_tables: list[list[int]]  # block ids of each request, after this step's allocation
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write, to do before the step
    # (row, sample) for every sample that draws a token this step: a request whose prompt or output is fully
    # computed after the step, and the forks of an n > 1 request, which sample from their parent's row
    samples: list[tuple[int, Request]] = field(default_factory=list)
    forks: list[tuple[Request, list[Request]]] = field(default_factory=list)  # (parent, its new samples)


class RequestQueue:
    """The waiting requests, in the order the policy serves them. Preempted requests go back in front."""

    def __init__(self) -> None:
        self._items: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._items.append(request)

    def prepend(self, request: Request) -> None:
        self._items.appendleft(request)

    def peek(self) -> Request:
        return self._items[0]

    def pop(self) -> Request:
        return self._items.popleft()

    def remove(self, request: Request) -> None:
        self._items.remove(request)

    def __contains__(self, request: object) -> bool:
        return request in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._items)


class FCFSQueue(RequestQueue):
    """First come, first served (arrival order)."""


QUEUE_POLICIES: dict[str, type[RequestQueue]] = {"fcfs": FCFSQueue}

# Makes sample `index` (1..n-1) of a parent request: the engine knows tokenizers, stop ids and seeds.
ForkFactory = Callable[[Request, int], Request]


class Scheduler:
    def __init__(self, kv_manager: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, make_fork: ForkFactory, policy: str = "fcfs") -> None:
        self.kv = kv_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.make_fork = make_fork
        if policy not in QUEUE_POLICIES:
            raise ConfigError(f"scheduling policy '{policy}' is not supported "
                              f"(supported: {', '.join(QUEUE_POLICIES)})")
        self.waiting: RequestQueue = QUEUE_POLICIES[policy]()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.add(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- before the step ----------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        self.kv.begin_step()
        scheduled: list[Request] = []
        new_tokens: list[int] = []
        preempted_now = False
        for request in list(self.running):
            if request not in self.running:  # preempted earlier in this loop
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if n <= 0:
                continue
            while not self.kv.allocate(request, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted_now = True
                if victim is request:
                    break
            else:
                self.kv.note_in_flight(request, request.num_computed_tokens + n)
                scheduled.append(request)
                new_tokens.append(n)
                budget -= n
        # New requests only join when nobody had to be preempted: they would just take the blocks back.
        while self.waiting and not preempted_now and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting.peek()
            # A prompt to be scored is computed whole: its cached blocks would have no logits.
            scored = request.params.prompt_logprobs is not None
            cached = self.kv.find_cached_prefix(request) if request.num_computed_tokens == 0 and not scored else []
            if self.kv.prefix_in_flight(request, cached):
                break  # its next prefix block is being computed right now: take it from the cache next step
            cached_tokens = len(cached) * self.kv.block_size
            n = min(request.num_tokens - request.num_computed_tokens - cached_tokens, budget)
            if not self.kv.allocate(request, n, cached):
                break
            self.kv.record_prefix_lookup(request.num_tokens, cached_tokens)
            request.num_computed_tokens += cached_tokens
            self.kv.note_in_flight(request, request.num_computed_tokens + n)
            self.waiting.pop()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(request)
            new_tokens.append(n)
            budget -= n
        tables = [[b.block_id for b in self.kv.block_table(r.request_id)] for r in scheduled]
        batch = ScheduledBatch(scheduled, new_tokens, tables, self.kv.take_pending_copies())
        self._plan_samples(batch)
        return batch

    def _plan_samples(self, batch: ScheduledBatch) -> None:
        """Who draws a token after this step: every request that reaches its end (a prefill chunk that stops
        short of it does not), and the other n - 1 samples of a request whose prompt completes now."""
        for row, (request, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            if request.num_computed_tokens + n < request.num_tokens or request.params.max_tokens == 0:
                continue
            batch.samples.append((row, request))
            if request.pending_forks:
                children = [self.make_fork(request, i) for i in range(1, request.pending_forks + 1)]
                request.pending_forks = 0
                batch.forks.append((request, children))
                batch.samples.extend((row, child) for child in children)

    # --- after the step -----------------------------------------------------------------------

    def update_from_output(self, batch: ScheduledBatch, output: SamplerOutput) -> list[Request]:
        """The step ran: advance each request's computed tokens, publish full blocks, start the forks (they
        share their parent's blocks), record each sampled token or a sample's own failure, and free the
        finished. Returns the requests that finished. (An output with no tokens at all only advances the
        computed tokens: tests that feed tokens themselves use that.)"""
        if output.token_ids and len(output.token_ids) != len(batch.samples):
            raise RuntimeError(f"runner returned {len(output.token_ids)} tokens for {len(batch.samples)} samples")
        for request, n in zip(batch.requests, batch.num_new_tokens):
            request.num_computed_tokens += n
            self.kv.cache_full_blocks(request)
            if request.params.max_tokens == 0 and request.num_computed_tokens == request.num_tokens:
                request.finish_prompt_only()
        for request, logprobs in output.prompt_logprobs:
            request.prompt_logprobs.extend(logprobs)
        for parent, children in batch.forks:
            for child in children:
                child.num_computed_tokens = parent.num_computed_tokens
                self.kv.fork(parent, child)
                child.status = RequestStatus.RUNNING
                self.running.append(child)
        for (_, sample), token, logprob, error in zip(batch.samples, output.token_ids, output.logprobs,
                                                      output.errors):
            if error is not None:
                logger.info("request %s failed: %s", sample.request_id, error)  # its caller reports it
                sample.fail(error)
            else:
                sample.append_token(token, self.max_model_len, logprob)
        return self.release_finished()

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.running.remove(request)
        self.waiting.prepend(request)
        self.num_preemptions += 1

    def remove(self, request: Request) -> None:
        """Drop a finished or aborted request and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)

    def abort(self, request: Request) -> None:
        if not request.is_finished:
            request.abort()
        self.remove(request)

    def release_finished(self) -> list[Request]:
        finished = [r for r in self.running if r.is_finished]
        for request in finished:
            self.remove(request)
        return finished
