"""Continuous batching: each step, pick which requests advance and by how many tokens.

Thinks in tokens, not phases: a request has `num_computed_tokens` (in the KV cache) against
`num_tokens` (prompt + output). Each step it gets up to the difference, within a token budget,
so a long prompt is prefilled in chunks while running requests keep decoding. Running requests
are served first (oldest first), then waiting ones in arrival order. When the KV pool runs dry
the newest running request is preempted: its blocks are freed and it is recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llminfer.engine.request import Request, RequestStatus
from llminfer.kv_cache import KVCacheManager


@dataclass
class ScheduledBatch:
    """Everything the model runner needs for one step (the scheduler -> runner boundary)."""

    requests: list[Request]
    num_new_tokens: list[int]
    block_tables: list[list[int]]  # block ids of each request, after this step's allocation
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write, to do before the step


class Scheduler:
    def __init__(self, kv_manager: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

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
            request = self.waiting[0]
            cached = self.kv.find_cached_prefix(request) if request.num_computed_tokens == 0 else []
            if self.kv.prefix_in_flight(request, cached):
                break  # its next prefix block is being computed right now: take it from the cache next step
            cached_tokens = len(cached) * self.kv.block_size
            n = min(request.num_tokens - request.num_computed_tokens - cached_tokens, budget)
            if not self.kv.allocate(request, n, cached):
                break
            self.kv.record_prefix_lookup(request.num_tokens, cached_tokens)
            request.num_computed_tokens += cached_tokens
            self.kv.note_in_flight(request, request.num_computed_tokens + n)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(request)
            new_tokens.append(n)
            budget -= n
        tables = [[b.block_id for b in self.kv.block_table(r.request_id)] for r in scheduled]
        return ScheduledBatch(scheduled, new_tokens, tables, self.kv.take_pending_copies())

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.running.remove(request)
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def add_running(self, request: Request) -> None:
        """A forked sample that already shares its parent's KV blocks."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def remove(self, request: Request) -> None:
        """Drop a finished or aborted request and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)

    def release_finished(self) -> list[Request]:
        finished = [r for r in self.running if r.is_finished]
        for request in finished:
            self.remove(request)
        return finished
