"""`llminfer bench serve`: drive a running server with streaming completions at a fixed concurrency and report
request throughput, output tokens/s, time to first token and time per output token (p50/p90/p99). With
`--compare llama-server`, the same requests then go to a llama-server that bench starts on the same GGUF with
the same slots and threads, and both tables and the ratio are printed.

The requests are `bench throughput`'s fixed-seed workloads (`--dataset fixed | synthetic-chat`), so the two
benchmarks run the same requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from llminfer.cli.bench import _log, gguf_file_of, percentiles, print_latency_percentiles, workload
from llminfer.config import available_cores
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


async def run_load(url: str, model: str | None, requests: list[tuple[list[int], int]], concurrency: int,
                   api_key: str | None) -> tuple[list[RequestTiming], float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency)
    done = 0

    async def one(http: httpx.AsyncClient, prompt: list[int], output_len: int) -> RequestTiming:
        nonlocal done
        body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        if model:
            body["model"] = model
        async with limit:
            timing = await _stream_one(http, url, body, headers)
        done += 1
        if done % max(len(requests) // 8, 1) == 0:
            _log(f"{done}/{len(requests)} requests done")
        return timing

    # A fresh connection per request: llama-server (cpp-httplib) closes a kept-alive connection after 5 s idle or
    # 5 requests, and a request sent on one it just closed fails with "Server disconnected" (2 of 64 did).
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=limits) as http:
        start = time.perf_counter()
        timings = await asyncio.gather(*(one(http, prompt, n) for prompt, n in requests))
        return list(timings), time.perf_counter() - start


def serve_benchmark_command(args: argparse.Namespace) -> int:
    requests = workload(args.dataset, args.num_prompts, args.input_len, args.output_len, 0, args.vocab_size)
    binary = None
    if args.compare == "llama-server":  # refused before anything is measured if it cannot run
        binary = llama_server_binary(args.llama_server)
    reports = [measure_server(args.url.rstrip("/"), args.model, requests, args)]
    if binary is not None:
        longest = max(len(prompt) + output_len for prompt, output_len in requests)
        with llama_server(binary, gguf_file_of(args.gguf), longest, args) as url:
            peer = measure_server(url, None, requests, args)
        peer["engine"] = "llama-server"
        reports.append(peer)
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else {"results": reports, **_ratio(reports)}, indent=2))
    else:
        for report in reports:
            _print_report(report)
        if len(reports) == 2:
            ratio = _ratio(reports)["ratio_vs_llama_server"]
            print(f"llminfer / llama-server: output tok/s {ratio['output_tokens_per_s']:.2f}x, req/s "
                  f"{ratio['requests_per_s']:.2f}x, TTFT p50 {ratio['ttft_p50']:.2f}x faster")
    return 0 if not any(r["failed"] for r in reports) else 1


def measure_server(url: str, model: str | None, requests: list[tuple[list[int], int]],
                   args: argparse.Namespace) -> dict:
    try:
        health = httpx.get(f"{url}/health", timeout=10)
    except httpx.HTTPError as exc:
        raise LLMInferError(f"cannot reach the server at {url}: {exc}") from None
    if health.status_code != 200:
        raise LLMInferError(f"server at {url} is not ready: /health answered {health.status_code}")
    shape = f"{args.input_len} tokens in, {args.output_len} out" if args.dataset == "fixed" else args.dataset
    _log(f"{len(requests)} streaming requests ({shape}) at concurrency {args.concurrency} against {url}")
    timings, elapsed = asyncio.run(run_load(url, model, requests, args.concurrency, args.api_key))
    ok = [t for t in timings if t.ok]
    output_tokens = sum(t.output_tokens for t in ok)
    prompt_tokens = sum(len(prompt) for (prompt, _), t in zip(requests, timings) if t.ok)
    return {
        "engine": "llminfer", "url": url, "dataset": args.dataset, "num_prompts": len(requests),
        "concurrency": args.concurrency, "input_len": args.input_len, "output_len": args.output_len,
        "seconds": elapsed, "completed": len(ok), "failed": len(timings) - len(ok),
        "requests_per_s": len(ok) / elapsed, "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (output_tokens + prompt_tokens) / elapsed,
        "ttft_s": percentiles([t.ttft for t in ok if t.ttft is not None]),
        "tpot_s": percentiles([t.tpot for t in ok if t.tpot is not None]),
        "errors": sorted({t.error for t in timings if not t.ok})[:5],
    }


def _ratio(reports: list[dict]) -> dict:
    ours, peer = reports
    ttft = (peer["ttft_s"]["p50"] or 0.0) / ours["ttft_s"]["p50"] if ours["ttft_s"]["p50"] else 0.0
    return {"ratio_vs_llama_server": {
        "output_tokens_per_s": ours["output_tokens_per_s"] / max(peer["output_tokens_per_s"], 1e-9),
        "requests_per_s": ours["requests_per_s"] / max(peer["requests_per_s"], 1e-9), "ttft_p50": ttft}}


def _print_report(report: dict) -> None:
    shape = (f"input {report['input_len']}  output {report['output_len']}" if report["dataset"] == "fixed"
             else report["dataset"])
    print(f"{report['engine']} at {report['url']}  prompts {report['num_prompts']}  concurrency "
          f"{report['concurrency']}  {shape}")
    print(f"completed {report['completed']}  failed {report['failed']}  in {report['seconds']:.1f} s: "
          f"{report['requests_per_s']:.2f} req/s, {report['output_tokens_per_s']:.1f} output tok/s, "
          f"{report['total_tokens_per_s']:.1f} total tok/s")
    print_latency_percentiles(report)
    for error in report["errors"]:
        print(f"error: {error}")


LLAMA_SERVER_HINT = ("llama-server: build it from llama.cpp's source (the llama-cpp-python sdist vendors it: "
                     "cmake -B build -DLLAMA_BUILD_SERVER=ON && cmake --build build --target llama-server, about 15 "
                     "minutes on 2 cores) and put it on PATH or pass --llama-server PATH")


def llama_server_binary(given: str | None) -> str:
    """The llama-server to start: --llama-server PATH, else the one on PATH; a one-line refusal otherwise."""
    if given is not None:
        path = Path(given).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise LLMInferError(f"--llama-server {given}: not an executable file")
        return str(path)
    found = shutil.which("llama-server")
    if found is None:
        raise LLMInferError(f"--compare llama-server: no llama-server on PATH. {LLAMA_SERVER_HINT}")
    return found


def llama_server_command(binary: str, gguf: str, port: int, longest_request: int,
                         args: argparse.Namespace) -> list[str]:
    """llama-server with our server's shape: one slot per request in flight, each slot's context holding the
    longest request (prompt and output), the same thread count."""
    slot_context = longest_request + 16
    return [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(args.concurrency),
            "-c", str(args.concurrency * slot_context), "-t", str(args.threads or available_cores())]


@contextlib.contextmanager
def llama_server(binary: str, gguf: str, longest_request: int, args: argparse.Namespace,
                 ready_timeout: float = 300.0):
    """A llama-server started for the comparison (its own environment, as the user gave it), stopped after."""
    from llminfer.cli.llama_cpp_peer import peer_environment

    port = args.llama_server_port
    command = llama_server_command(binary, gguf, port, longest_request, args)
    _log(f"starting {' '.join(command)}")
    log_file = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=peer_environment())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                log_file.seek(0)
                tail = (log_file.read().strip().splitlines() or ["no output"])[-1]
                raise LLMInferError(f"llama-server exited with code {process.returncode} before it was ready: {tail}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise LLMInferError(f"llama-server was not ready at {url} after {ready_timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log_file.close()
