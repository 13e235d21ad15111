"""The engine behind the server: one worker thread owns the `LLMEngine` and runs its step loop; HTTP handlers
(on the asyncio event loop) only submit, read and abort, through a command queue.

The engine is not thread-safe, so nothing but the worker touches it. Outputs travel back to each request's
asyncio queue with `call_soon_threadsafe`. A request that fails alone (non-finite logits) finishes with
finish_reason "error" and the engine goes on. If a step itself raises, every in-flight request gets the
error, the engine is marked failed and the worker stops: a half-updated engine is never stepped again.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

from llminfer.engine.llm_engine import LLMEngine
from llminfer.engine.outputs import RequestOutput
from llminfer.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine failed (or was shut down); no request can be served."""


@dataclass
class EngineSnapshot:
    """What the metrics and the overload check read, refreshed by the worker on every loop."""

    num_running: int = 0
    num_waiting: int = 0  # samples, not prompts: a request with n = 4 waits as 4
    kv_cache_usage: float = 0.0
    prefix_cache_hit_ratio: float = 0.0


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput, then nothing more once finished; or an exception
    samples: int = 1  # what the request weighs in the waiting count: its n

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


# A wave of clients sending their next requests after the last wave finished arrives over a few milliseconds
# (one HTTP round trip each, read by one event loop). Stepping on the first arrival runs a batch of 1-2 while
# the rest trickle in behind it, and those small steps cost nearly as much as a full one (the weights are read
# once per step whatever the batch). So while the batch is mostly empty and requests keep arriving less than
# ARRIVAL_GAP_S apart, the worker waits for them, at most GATHER_S, and they join one step.
ARRIVAL_GAP_S = 0.002
GATHER_S = 0.010


class AsyncEngine:
    def __init__(self, engine: LLMEngine, arrival_gap_s: float = ARRIVAL_GAP_S, gather_s: float = GATHER_S) -> None:
        self.engine = engine
        self.arrival_gap_s = arrival_gap_s
        self.gather_s = gather_s
        self.snapshot = EngineSnapshot()
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._pending_adds = 0  # samples submitted, not yet seen by the worker (guarded by _lock)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}  # worker-only
        self._stopping = False
        self._exited = False  # set by the worker before its last look at the command queue
        self._thread = threading.Thread(target=self._run, name="llminfer-engine", daemon=True)

    # --- called from the event loop -----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._thread.is_alive() and not self._stopping

    @property
    def num_waiting(self) -> int:
        """Samples queued but not running: those the scheduler holds plus those not yet handed to it."""
        return self.snapshot.num_waiting + self._pending_adds

    @property
    def num_in_flight(self) -> int:
        """Requests the engine still has to finish (none once the worker has ended: see _run's finally)."""
        return self.snapshot.num_running + self.num_waiting

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> "_Stream":
        """Hand a request to the worker now (it counts as waiting from this moment); read it with `stream`."""
        if not self.is_alive:
            raise EngineDeadError(self._dead_reason())
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), params.n)
        with self._lock:
            self._pending_adds += params.n
        self._commands.put(("add", request_id, prompt_token_ids, params, stream))
        self._wake.set()
        if self._exited:  # the worker ended after the check above: nobody else will answer this command
            self._fail_queued_commands()
        return stream

    async def stream(self, request_id: str, stream: "_Stream") -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that advanced it. Leaving the loop early (client gone,
        task cancelled) aborts the request and frees its KV blocks."""
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """submit, then stream."""
        stream = self.submit(request_id, prompt_token_ids, params)
        async for output in self.stream(request_id, stream):
            yield output

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def _dead_reason(self) -> str:
        if self.error is not None:
            return f"engine failed: {type(self.error).__name__}: {self.error}"
        return "engine is shutting down"

    # --- the worker thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                if self._apply_commands():
                    self._gather_arrivals()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                for output in outputs:
                    stream = self._streams.get(output.request_id)
                    if stream is None:
                        continue
                    stream.put(output)
                    if output.finished:
                        del self._streams[output.request_id]
                self._refresh_snapshot()
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the waiting clients
            logger.exception("engine step failed; the server stops serving")
            self.error = exc
            failure = EngineDeadError(self._dead_reason())
            for stream in self._streams.values():
                stream.put(failure)
            self._streams.clear()
        finally:
            self._exited = True
            self._fail_queued_commands()
            self.snapshot = EngineSnapshot()  # nothing runs or waits any more

    def _queued_commands(self) -> Iterator[tuple]:
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def _gather_arrivals(self) -> None:
        """Requests just arrived: while the batch has room for many more and they keep coming, wait for them."""
        scheduler = self.engine.scheduler
        deadline = time.monotonic() + self.gather_s
        while not self._stopping and len(scheduler.running) + len(scheduler.waiting) < scheduler.max_num_seqs // 2:
            left = deadline - time.monotonic()
            if left <= 0 or not self._wake.wait(min(self.arrival_gap_s, left)):
                return
            self._wake.clear()
            self._apply_commands()

    def _apply_commands(self) -> int:
        """Hand queued adds and aborts to the engine; returns how many requests were added."""
        added = 0
        for command in self._queued_commands():
            if command[0] == "add":
                _, request_id, prompt_ids, params, stream = command
                with self._lock:
                    self._pending_adds -= stream.samples
                try:
                    self.engine.add_request(prompt_ids, params, request_id=request_id)
                except Exception as exc:  # noqa: BLE001 - a bad request fails alone; the engine is untouched
                    stream.put(exc)
                    continue
                self._streams[request_id] = stream
                added += 1
            else:
                _, request_id = command
                if self._streams.pop(request_id, None) is not None:
                    self.engine.abort(request_id)
        self._refresh_snapshot()
        return added

    def _fail_queued_commands(self) -> None:
        failure = EngineDeadError(self._dead_reason())
        for command in self._queued_commands():
            if command[0] == "add":
                with self._lock:
                    self._pending_adds -= command[4].samples
                command[4].put(failure)

    def _refresh_snapshot(self) -> None:
        stats = self.engine.kv_cache_stats()
        scheduler = self.engine.scheduler
        waiting = sum(1 + request.pending_forks for request in scheduler.waiting)  # a group waits as n samples
        self.snapshot = EngineSnapshot(len(scheduler.running), waiting,
                                       stats.used_blocks / stats.total_blocks, stats.prefix_cache_hit_rate)
