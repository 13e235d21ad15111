"""Decides, each step, which requests run: admit waiting ones (prefill) or advance running ones (decode).

Continuous batching in its simplest form: a request joins as soon as a cache slot is free and
leaves the moment it finishes, freeing its slot for the next.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llminfer.engine.request import Request, RequestStatus
from llminfer.kv_cache import ContiguousKVCache


@dataclass
class ScheduledBatch:
    """What the scheduler hands the model runner: these requests, each with this many new tokens."""

    requests: list[Request]
    num_new_tokens: list[int]


class Scheduler:
    def __init__(self, cache: ContiguousKVCache, max_num_seqs: int, max_prefill_tokens: int = 8192) -> None:
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        admitted = self._admit_waiting()
        if admitted:
            return ScheduledBatch(admitted, [r.num_tokens - r.num_computed_tokens for r in admitted])
        return ScheduledBatch(list(self.running), [1] * len(self.running))

    def _admit_waiting(self) -> list[Request]:
        admitted, budget = [], self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_num_seqs and self.cache.num_free_slots:
            request = self.waiting[0]
            if admitted and request.num_tokens > budget:
                break
            self.waiting.popleft()
            request.cache_slot = self.cache.allocate_slot()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            admitted.append(request)
            budget -= request.num_tokens
        return admitted

    def release_finished(self) -> list[Request]:
        finished = [r for r in self.running if r.is_finished]
        for request in finished:
            self.cache.free_slot(request.cache_slot)
            request.cache_slot = None
        self.running = [r for r in self.running if not r.is_finished]
        return finished
