"""Prometheus metrics, named as vLLM users expect (with our prefix). Each server owns its registry, so that
several apps in one process (tests) do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llminfer.server.async_engine import EngineSnapshot

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("llminfer_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("llminfer_num_requests_waiting", "Samples queued for the engine (n = 4 counts 4)",
                             registry=r)
        self.kv_usage = Gauge("llminfer_kv_cache_usage_ratio", "KV blocks in use / all blocks (0..1)", registry=r)
        self.prefix_hit = Gauge("llminfer_prefix_cache_hit_ratio",
                                "Prompt tokens found in the prefix cache / prompt tokens looked up", registry=r)
        self.prompt_tokens = Counter("llminfer_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("llminfer_generation_tokens", "Generated tokens", registry=r)
        self.request_success = Counter("llminfer_request_success", "Requests finished, by finish reason",
                                       ["finished_reason"], registry=r)
        self.ttft = Histogram("llminfer_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("llminfer_time_per_output_token_seconds", "Mean time between output tokens",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("llminfer_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def render(self, snapshot: EngineSnapshot, num_waiting: int) -> bytes:
        """num_waiting: the scheduler's queue plus requests not yet handed to it."""
        self.running.set(snapshot.num_running)
        self.waiting.set(num_waiting)
        self.kv_usage.set(snapshot.kv_cache_usage)
        self.prefix_hit.set(snapshot.prefix_cache_hit_ratio)
        return generate_latest(self.registry)

    def record_finished(self, prompt_tokens: int, output_tokens: int, longest_output: int, finish_reasons: list[str],
                        arrival: float, first_token: float | None, end: float) -> None:
        """One request (all its choices) is done; times from time.monotonic()."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        for reason in finish_reasons:
            self.request_success.labels(finished_reason=reason).inc()
        self.e2e.observe(end - arrival)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            if longest_output > 1:
                self.tpot.observe((end - first_token) / (longest_output - 1))
