"""`llminfer bench serve`: drive a running server with streaming completions at a fixed concurrency and report
request throughput, output tokens/s, time to first token and time per output token (p50/p90/p99).

The prompts are `bench throughput`'s fixed-seed token ids, so the two benchmarks run the same workload.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass

import httpx
import numpy as np

from llminfer.cli.bench import _log, synthetic_prompts
from llminfer.errors import LLMInferError


@dataclass
class RequestTiming:
    ok: bool
    seconds: float
    ttft: float | None = None  # first text chunk, from the request's start
    output_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.seconds - self.ttft) / (self.output_tokens - 1)


async def _stream_one(http: httpx.AsyncClient, url: str, body: dict, headers: dict) -> RequestTiming:
    start = time.perf_counter()
    ttft, tokens = None, 0
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                return RequestTiming(False, time.perf_counter() - start, error=f"{response.status_code} "
                                                                             f"{response.text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestTiming(False, time.perf_counter() - start, error=chunk["error"]["message"])
                if ttft is None and any(c.get("text") for c in chunk["choices"]):
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return RequestTiming(False, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")
    return RequestTiming(True, time.perf_counter() - start, ttft, tokens)


async def run_load(url: str, model: str | None, prompts: list[list[int]], output_len: int, concurrency: int,
                   api_key: str | None) -> tuple[list[RequestTiming], float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency)
    done = 0

    async def one(http: httpx.AsyncClient, prompt: list[int]) -> RequestTiming:
        nonlocal done
        body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        if model:
            body["model"] = model
        async with limit:
            timing = await _stream_one(http, url, body, headers)
        done += 1
        if done % max(len(prompts) // 8, 1) == 0:
            _log(f"{done}/{len(prompts)} requests done")
        return timing

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=limits) as http:
        start = time.perf_counter()
        timings = await asyncio.gather(*(one(http, p) for p in prompts))
        return list(timings), time.perf_counter() - start


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


def serve_benchmark_command(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    try:
        health = httpx.get(f"{url}/health", timeout=10)
    except httpx.HTTPError as exc:
        raise LLMInferError(f"cannot reach the server at {url}: {exc}") from None
    if health.status_code != 200:
        raise LLMInferError(f"server at {url} is not ready: /health answered {health.status_code}")
    prompts = synthetic_prompts(args.num_prompts, args.input_len, 0, args.vocab_size)
    _log(f"{args.num_prompts} streaming requests ({args.input_len} tokens in, {args.output_len} out) at concurrency "
         f"{args.concurrency} against {url}")
    timings, elapsed = asyncio.run(run_load(url, args.model, prompts, args.output_len, args.concurrency,
                                            args.api_key))
    ok = [t for t in timings if t.ok]
    output_tokens = sum(t.output_tokens for t in ok)
    report = {
        "url": url, "num_prompts": args.num_prompts, "concurrency": args.concurrency, "input_len": args.input_len,
        "output_len": args.output_len, "seconds": elapsed, "completed": len(ok), "failed": len(timings) - len(ok),
        "requests_per_s": len(ok) / elapsed, "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (output_tokens + len(ok) * args.input_len) / elapsed,
        "ttft_s": _percentiles([t.ttft for t in ok if t.ttft is not None]),
        "tpot_s": _percentiles([t.tpot for t in ok if t.tpot is not None]),
        "errors": sorted({t.error for t in timings if not t.ok})[:5],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if not report["failed"] else 1
    print(f"server {url}  prompts {args.num_prompts}  concurrency {args.concurrency}  input {args.input_len}  "
          f"output {args.output_len}")
    print(f"completed {len(ok)}  failed {report['failed']}  in {elapsed:.1f} s: {report['requests_per_s']:.2f} req/s, "
          f"{report['output_tokens_per_s']:.1f} output tok/s, {report['total_tokens_per_s']:.1f} total tok/s")
    for name, key in [("time to first token", "ttft_s"), ("time per output token", "tpot_s")]:
        p = report[key]
        if p["p50"] is not None:
            print(f"{name:<22} p50 {p['p50'] * 1000:8.1f} ms  p90 {p['p90'] * 1000:8.1f} ms  "
                  f"p99 {p['p99'] * 1000:8.1f} ms")
    for error in report["errors"]:
        print(f"error: {error}")
    return 0 if not report["failed"] else 1

