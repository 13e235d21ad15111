"""Benchmarks. Both engines get the same random prompt ids, greedy decoding and no early stop; with
`--compare hf`, Hugging Face transformers runs the same weights in the same process, and with `--compare
llama.cpp` llama.cpp runs the same GGUF with the same thread count in a child process, so the ratio is measured
under identical conditions.

`llminfer bench latency`: prefill tokens/s, decode tokens/s and time to first token of one batch
(median of --iters runs).
`llminfer bench throughput`: a fixed-seed workload of many requests through continuous batching:
requests/s, output and total tokens/s, peak KV blocks against a contiguous per-request reservation,
prefix-cache hit rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from llminfer.cli.main import model_options
from llminfer.config import available_cores


def _log(message: str) -> None:
    print(f"llminfer: {message}", file=sys.stderr, flush=True)


def _print_table(results: list, columns: list[tuple[str, str, str]]) -> None:
    """One row per engine; columns are (title, result attribute, format spec)."""
    width = max(14, *(len(r.engine) + 2 for r in results))
    print(f"{'engine':<{width}}" + "".join(f"{title:>{len(title) + 3}}" for title, _, _ in columns))
    for r in results:
        print(f"{r.engine:<{width}}"
              + "".join(f"{getattr(r, attr):>{len(title) + 3}{spec}}" for title, attr, spec in columns))


# --compare value -> the report's ratio key and the peer's name in the table
RATIO_KEYS = {"hf": "ratio_vs_transformers", "llama.cpp": "ratio_vs_llama_cpp"}
PEER_NAMES = {"hf": "transformers", "llama.cpp": "llama.cpp"}


@dataclass
class LatencyResult:
    engine: str
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    ttft_ms: float


def _median_result(engine: str, runs: list[tuple[float, float]], input_tokens: int,
                   output_tokens: int) -> LatencyResult:
    ttft = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return LatencyResult(engine, input_tokens / ttft, (output_tokens - 1) / decode if output_tokens > 1 else 0.0,
                         ttft * 1e3)


def _label(llm, model: str) -> str:
    """A row title: the model as given, with what it runs as (dtype, quantization, KV cache)."""
    parts = [llm.config.dtype]
    if llm.model.quantization is not None:
        parts.append(llm.model.quantization.describe())
    if llm.engine.kv_cache_dtype != "auto":
        parts.append(f"kv {llm.engine.kv_cache_dtype}")
    return f"{model} [{', '.join(parts)}]"


def measure_llminfer(llm, prompts: list[list[int]], output_len: int, iters: int,
                     log: Callable[[str], None], label: str = "llminfer") -> LatencyResult:
    from llminfer.engine import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    def run() -> tuple[float, float]:
        for p in prompts:
            llm.engine.add_request(p, params)
        start = time.perf_counter()
        llm.engine.step()  # prefill + first token
        first = time.perf_counter()
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
        return first - start, time.perf_counter() - first

    run()  # warm-up: allocates the cache, warms kernels
    runs = []
    for i in range(iters):
        runs.append(run())
        log(f"llminfer run {i + 1}/{iters}: ttft {runs[-1][0] * 1e3:.0f} ms, decode {runs[-1][1]:.2f} s")
    return _median_result(label, runs, sum(map(len, prompts)), output_len * len(prompts))


def measure_lite(folder: str, prompts: list[list[int]], output_len: int, iters: int,
                 log: Callable[[str], None]) -> LatencyResult:
    """An `llminfer export` folder on the lite runtime (onnxruntime), prompts one after another."""
    from llminfer.engine import SamplingParams
    from llminfer.lite import LiteModel

    model = LiteModel(folder, threads=torch.get_num_threads())
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    def run() -> tuple[float, float]:
        ttft = decode = 0.0
        for prompt in prompts:
            start = time.perf_counter()
            steps = model.stream(prompt, params)
            next(steps)  # prefill + first token
            first = time.perf_counter()
            for _ in steps:
                pass
            ttft, decode = ttft + first - start, decode + time.perf_counter() - first
        return ttft, decode

    run()
    runs = []
    for i in range(iters):
        runs.append(run())
        log(f"lite run {i + 1}/{iters}: ttft {runs[-1][0] * 1e3:.0f} ms, decode {runs[-1][1]:.2f} s")
    label = f"{folder} [onnxruntime, {model.manifest['dtype']}" + (
        f", {model.manifest['quantization']}]" if model.manifest.get("quantization") else "]")
    return _median_result(label, runs, sum(map(len, prompts)), output_len * len(prompts))


def measure_transformers(model_path: str, dtype: str, device: str, prompts: list[list[int]], output_len: int,
                         iters: int, log: Callable[[str], None]) -> LatencyResult:
    import inspect

    hf_model = load_transformers_model(model_path, dtype, device)
    ids = torch.tensor(prompts, device=device)
    # transformers >= 5.2x renamed the cache argument from past_key_values to cache.
    cache_arg = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def run() -> tuple[float, float]:
        start = time.perf_counter()
        out = hf_model(ids, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        first = time.perf_counter()
        past = out.past_key_values
        for _ in range(output_len - 1):
            out = hf_model(token, use_cache=True, **{cache_arg: past})
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return first - start, time.perf_counter() - first

    run()
    runs = []
    for i in range(iters):
        runs.append(run())
        log(f"transformers run {i + 1}/{iters}: ttft {runs[-1][0] * 1e3:.0f} ms, decode {runs[-1][1]:.2f} s")
    return _median_result("transformers", runs, ids.numel(), output_len * len(prompts))


def measure_llama_cpp(model: str, prompts: list[list[int]], output_len: int, iters: int,
                      log: Callable[[str], None], weights: tuple[str, str | None] | None = None
                      ) -> tuple[LatencyResult, str]:
    """llama.cpp on the model's GGUF file (or its weights requantized to `weights`: (matrix type, token embedding
    type)), with this process's thread count (see cli/llama_cpp_peer.py); and the file it ran."""
    from llminfer.cli import llama_cpp_peer

    source = gguf_file_of(model)
    gguf = source
    if weights is not None:
        gguf = llama_cpp_peer.requantized_gguf(source, weights[0], log, embedding_type=weights[1])
    runs, _ = llama_cpp_peer.measure(gguf, prompts, output_len, iters, torch.get_num_threads(), log)
    for i, (ttft, decode) in enumerate(runs):
        log(f"llama.cpp run {i + 1}/{iters}: ttft {ttft * 1e3:.0f} ms, decode {decode:.2f} s")
    label = f"llama.cpp {weights[0]}" if gguf != source else "llama.cpp"
    return _median_result(label, runs, sum(map(len, prompts)), output_len * len(prompts)), gguf


# What llama.cpp runs beside each of our schemes: the same bits per weight (int4 groups of 32 with a scale and a
# minimum: Q4_1, its token embedding Q8_0 as llama.cpp's quantizer keeps it; int8: Q8_0). The model's GGUF itself
# when it already is that (SmolLM2's Q4_1 file), else the same weights requantized once.
LLAMA_CPP_WEIGHTS = {"a16w4": ("Q4_1", "Q8_0"), "a16w8": ("Q8_0", None), "a8w8": ("Q8_0", None)}


def gguf_file_of(model: str) -> str:
    """The GGUF file llama.cpp can run for `model`, or a one-line refusal before anything is measured."""
    from llminfer.errors import ConfigError
    from llminfer.loading import open_checkpoint

    checkpoint = open_checkpoint(model)
    if checkpoint.format != "gguf":
        raise ConfigError(f"--compare llama.cpp runs a GGUF file; {model} is a {checkpoint.format} checkpoint "
                          "(give the .gguf it came from, or an alias such as smollm2-135m)")
    return str(checkpoint.path)


def load_transformers_model(model: str, dtype: str, device: str):
    """The same checkpoint in Hugging Face transformers (test/bench peer only)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        from llminfer.errors import LLMInferError

        raise LLMInferError("--compare hf needs transformers (pip install transformers accelerate gguf)") from None

    from llminfer.loading import open_checkpoint

    checkpoint = open_checkpoint(model)
    kwargs = {"dtype": getattr(torch, dtype)}
    if checkpoint.format == "gguf":
        path = Path(checkpoint.path)
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs).to(device).eval()
    return AutoModelForCausalLM.from_pretrained(str(checkpoint.path), **kwargs).to(device).eval()


def latency_command(args: argparse.Namespace) -> int:
    from llminfer.engine import LLM

    log = _log
    log(f"loading {args.model} ({args.dtype}, {args.device}, {args.threads or available_cores()} threads)")
    if args.compare == "llama.cpp":  # refused before the load if it cannot run
        from llminfer.cli.llama_cpp_peer import check_available

        gguf_file_of(args.model)
        check_available()
    # Prefix caching off: every timed run repeats the warm-up's prompts, and cached blocks would turn most of the
    # "prefill" into lookups (7 of 8 blocks of a 128-token prompt), overstating prefill tokens/s.
    llm = LLM(args.model, **model_options(args), max_num_seqs=args.batch_size, enable_prefix_caching=False)
    dtype = llm.config.dtype  # "auto" resolved
    streamed = {"llminfer": weight_bytes_per_step(llm.model)}
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, llm.model_config.vocab_size - 100, (args.batch_size, args.input_len),
                            generator=generator).tolist()
    first_label = _label(llm, args.model) if args.compare_with else "llminfer"
    results = [measure_llminfer(llm, prompts, args.output_len, args.iters, log, label=first_label)]
    prefix_hits = llm.engine.kv.stats().prefix_cache_hit_tokens  # 0: every run computed its whole prompt
    for other in args.compare_with:  # quantized folders or ONNX exports of the same model, measured in this run
        log(f"loading {other}")
        if (Path(other) / "export.json").is_file():
            results.append(measure_lite(other, prompts, args.output_len, args.iters, log))
            continue
        del llm
        llm = LLM(other, **{**model_options(args), "dtype": "auto", "quantization": None},
                  max_num_seqs=args.batch_size, enable_prefix_caching=False)
        results.append(measure_llminfer(llm, prompts, args.output_len, args.iters, log, label=_label(llm, other)))
    if args.compare == "llama.cpp":
        scheme = llm.model.quantization.scheme if llm.model.quantization is not None else None
        peer, peer_gguf = measure_llama_cpp(args.model, prompts, args.output_len, args.iters, log,
                                            LLAMA_CPP_WEIGHTS.get(scheme))
        results.append(peer)
        streamed[peer.engine] = gguf_weight_bytes_per_step(peer_gguf)
    if args.compare == "hf":
        del llm
        results.append(measure_transformers(args.model, dtype, args.device, prompts, args.output_len,
                                            args.iters, log))
    report = {
        "model": args.model, "dtype": dtype, "device": args.device, "threads": torch.get_num_threads(),
        "omp_spin_count": os.environ.get("GOMP_SPINCOUNT", "libgomp's default"),
        "batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
        "prefix_cache_hit_tokens": prefix_hits,
        "results": [asdict(r) for r in results],
        "memory_gb_per_s": memory_bandwidth(log),
        "weight_gb_per_step": {engine: size / 1e9 for engine, size in streamed.items()},
    }
    if args.compare_with:
        base = results[0]
        report["ratio_vs_first"] = {r.engine: {"prefill": r.prefill_tokens_per_s / base.prefill_tokens_per_s,
                                               "decode": r.decode_tokens_per_s / base.decode_tokens_per_s}
                                    for r in results[1:len(args.compare_with) + 1]}
    if args.compare:  # the peer was measured last
        ours, peer = results[0], results[-1]
        report[RATIO_KEYS[args.compare]] = {
            "prefill": ours.prefill_tokens_per_s / peer.prefill_tokens_per_s,
            "decode": ours.decode_tokens_per_s / peer.decode_tokens_per_s,
            "ttft": peer.ttft_ms / ours.ttft_ms,
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {args.model}  dtype {dtype}  device {args.device}  threads {report['threads']} "
          f"(spin {report['omp_spin_count']})  batch {args.batch_size}  input {args.input_len}  "
          f"output {args.output_len}")
    _print_table(results, [("prefill tok/s", "prefill_tokens_per_s", ".1f"),
                           ("decode tok/s", "decode_tokens_per_s", ".1f"),
                           ("TTFT ms", "ttft_ms", ".1f")])
    for label, ratio in report.get("ratio_vs_first", {}).items():
        print(f"{label} / {results[0].engine}: prefill {ratio['prefill']:.2f}x, decode {ratio['decode']:.2f}x")
    if args.compare:
        ratio, peer = report[RATIO_KEYS[args.compare]], PEER_NAMES[args.compare]
        print(f"llminfer / {peer}: prefill {ratio['prefill']:.2f}x, decode {ratio['decode']:.2f}x, "
              f"TTFT {ratio['ttft']:.2f}x faster")
    bandwidth = report["memory_gb_per_s"]
    for result in results:
        if result.engine in report["weight_gb_per_step"]:
            size = report["weight_gb_per_step"][result.engine]
            streamed_rate = size * result.decode_tokens_per_s / args.batch_size  # one pass over the weights a step
            print(f"{result.engine}: decode reads {size:.3f} GB of weights a step, {streamed_rate:.1f} GB/s = "
                  f"{streamed_rate / bandwidth:.0%} of the {bandwidth:.1f} GB/s torch.sum reads from this memory")
    return 0


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads: every parameter and packed int4 table once, a head tied to the
    embedding once (it reads the matrix whole), but not an embedding table the head does not share (a step reads
    one row of it per token)."""
    embedding = model.model.embed_tokens.weight
    head = getattr(model.lm_head, "weight", None)
    tied = head is not None and head.data_ptr() == embedding.data_ptr()
    tensors = {t.data_ptr(): t for t in model.parameters()}
    tensors.update({t.data_ptr(): t for name, t in model.named_buffers() if name.endswith(".table")})
    if not tied:
        tensors.pop(embedding.data_ptr(), None)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def gguf_weight_bytes_per_step(path: str) -> int:
    """The same for a GGUF file that llama.cpp runs: every tensor but a token embedding beside its own output."""
    import gguf

    tensors = {tensor.name: int(tensor.n_bytes) for tensor in gguf.GGUFReader(path).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def memory_bandwidth(log: Callable[[str], None], gib: int = 1) -> float:
    """GB/s that torch.sum reads over `gib` GiB of float32 with this process's threads (best of 3): the roofline a
    decode step that streams its weights from memory runs against."""
    data = torch.ones(gib * 2**28)
    data.sum()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    rate = data.numel() * 4 / best / 1e9
    log(f"memory: torch.sum reads {rate:.1f} GB/s over {gib} GiB ({torch.get_num_threads()} threads)")
    return rate


@dataclass
class ThroughputResult:
    engine: str
    seconds: float
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float


def synthetic_prompts(num_prompts: int, input_len: int, prefix_len: int, vocab_size: int) -> list[list[int]]:
    """Fixed-seed prompts: a shared prefix of prefix_len tokens, then input_len tokens of each prompt's own."""
    generator = torch.Generator().manual_seed(0)
    shared = torch.randint(100, vocab_size - 100, (prefix_len,), generator=generator).tolist()
    own = torch.randint(100, vocab_size - 100, (num_prompts, input_len), generator=generator).tolist()
    return [shared + row for row in own]


# synthetic-chat: chat-like traffic, many short requests and a few long ones (lengths log-uniform in these ranges)
CHAT_PROMPT_LENGTHS, CHAT_OUTPUT_LENGTHS = (16, 1024), (16, 512)


def workload(dataset: str, num_prompts: int, input_len: int, output_len: int, prefix_len: int,
             vocab_size: int) -> list[tuple[list[int], int]]:
    """(prompt ids, output tokens) per request, fixed-seed. `fixed`: every prompt input_len tokens after a shared
    prefix of prefix_len, every output output_len. `synthetic-chat`: prompt and output lengths drawn log-uniformly
    from CHAT_PROMPT_LENGTHS and CHAT_OUTPUT_LENGTHS."""
    if dataset == "fixed":
        return [(p, output_len) for p in synthetic_prompts(num_prompts, input_len, prefix_len, vocab_size)]
    generator = torch.Generator().manual_seed(0)

    def lengths(bounds: tuple[int, int]) -> list[int]:
        low, high = torch.tensor(bounds, dtype=torch.float64).log()
        drawn = (low + (high - low) * torch.rand(num_prompts, generator=generator, dtype=torch.float64)).exp()
        return drawn.round().long().clamp(*bounds).tolist()

    prompt_lengths, output_lengths = lengths(CHAT_PROMPT_LENGTHS), lengths(CHAT_OUTPUT_LENGTHS)
    return [(torch.randint(100, vocab_size - 100, (n,), generator=generator).tolist(), out)
            for n, out in zip(prompt_lengths, output_lengths)]


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = torch.tensor(values, dtype=torch.float64).quantile(torch.tensor([0.5, 0.9, 0.99],
                                                                                    dtype=torch.float64)).tolist()
    return {"p50": p50, "p90": p90, "p99": p99}


def print_latency_percentiles(report: dict) -> None:
    for name, key in [("time to first token", "ttft_s"), ("time per output token", "tpot_s")]:
        p = report[key]
        if p["p50"] is not None:
            print(f"{name:<22} p50 {p['p50'] * 1000:8.1f} ms  p90 {p['p90'] * 1000:8.1f} ms  "
                  f"p99 {p['p99'] * 1000:8.1f} ms")


class StepProfile:
    """Where an engine step's time goes, phase by phase, for the pure-decode steps of the widest batch (the
    steady state of a many-request run). The engine's methods are wrapped on this instance only, so nothing is
    timed outside a benchmark: the forward pass (a graph replay on CPU: kernels only, no Python) against
    everything around it, which must stay flat as the batch grows."""

    PHASES = ("schedule", "prepare inputs", "forward + logits", "sampler", "update requests")

    def __init__(self, engine) -> None:
        self.current: dict[str, float] = {}
        self.decode_steps: dict[int, list[dict[str, float]]] = {}  # batch size -> each step's phases
        scheduler, runner = engine.scheduler, engine.runner
        scheduler.schedule = self._timed("schedule", scheduler.schedule)
        runner.prepare = self._timed("prepare inputs", runner.prepare)
        runner.execute = self._timed("forward + logits", runner.execute)
        runner.sampler = self._timed("sampler", runner.sampler)
        scheduler.update_from_output = self._timed("update requests", scheduler.update_from_output)
        self.last_batch = None

    def _timed(self, phase: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            self.current[phase] = self.current.get(phase, 0.0) + time.perf_counter() - start
            if phase == "schedule":
                self.last_batch = result
            return result
        return timed

    def start_step(self) -> None:
        self.current, self.last_batch = {}, None
        self._step_start = time.perf_counter()

    def end_step(self) -> None:
        batch = self.last_batch
        if batch is None or not batch.requests or any(n != 1 for n in batch.num_new_tokens):
            return
        self.current["step"] = time.perf_counter() - self._step_start
        self.decode_steps.setdefault(len(batch.requests), []).append(self.current)

    def report(self) -> dict | None:
        if not self.decode_steps:
            return None
        batch_size = max(self.decode_steps)
        steps = self.decode_steps[batch_size][1:] or self.decode_steps[batch_size]  # the first one records
        mean = {phase: statistics.fmean(s.get(phase, 0.0) for s in steps) * 1e3 for phase in (*self.PHASES, "step")}
        mean["other"] = mean["step"] - sum(mean[phase] for phase in self.PHASES)
        outside = mean["step"] - mean["forward + logits"]
        return {"batch_size": batch_size, "steps": len(steps), "ms": mean,
                "outside_forward_share": outside / mean["step"]}


def print_step_profile(profile: dict) -> None:
    ms = profile["ms"]
    print(f"step profile: {profile['steps']} pure-decode steps of batch {profile['batch_size']}, "
          f"{ms['step']:.1f} ms each")
    for phase in (*StepProfile.PHASES, "other"):
        print(f"  {phase:<18}{ms[phase]:>8.2f} ms {ms[phase] / ms['step']:>7.1%}")
    print(f"  outside the forward pass: {profile['outside_forward_share']:.1%} of the step")


def drive_workload(engine, requests: list[tuple[list[int], int]], extra_params: Callable[[int], dict],
                   profile: StepProfile | None, log: Callable[[str], None]) -> dict:
    """Queue every request at once (greedy, EOS ignored, extra_params(i) on top) and step the engine to the
    end: elapsed seconds, each request's first-token and finish times, output lengths, KV occupancy."""
    from llminfer.engine import SamplingParams

    for i, (prompt, output_len) in enumerate(requests):
        engine.add_request(prompt, SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True,
                                                  **extra_params(i)), request_id=str(i))
    peak = {"used_slots": 0, "tokens_held": 0}
    slot_steps = token_steps = 0  # KV slots in use and tokens they hold, summed over steps
    first_token, finished, lengths = {}, {}, {}  # request id -> seconds from the start (all arrive at 0)
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        if profile is not None:
            profile.start_step()
        outputs = engine.step()
        if profile is not None:
            profile.end_step()
        now = time.perf_counter() - start
        for output in outputs:
            if output.outputs[0].token_ids:
                first_token.setdefault(output.request_id, now)
            if output.finished:
                finished[output.request_id] = now
                lengths[output.request_id] = len(output.outputs[0].token_ids)
        batch_tokens = sum(len(o.outputs) for o in outputs)
        steps += 1
        used_slots = engine.kv_cache_stats().used_blocks * engine.kv.block_size
        held = sum(r.num_computed_tokens for r in engine.scheduler.running)
        slot_steps, token_steps = slot_steps + used_slots, token_steps + held
        if used_slots > peak["used_slots"]:
            peak.update(used_slots=used_slots, tokens_held=held)
        if steps % 20 == 0:
            log(f"step {steps}: {batch_tokens} requests advanced, {len(engine.scheduler.waiting)} waiting")
    return {"elapsed": time.perf_counter() - start, "first_token": first_token, "finished": finished,
            "output_lengths": [lengths[str(i)] for i in range(len(requests))], "peak": peak, "steps": steps,
            "slot_overhead_mean": slot_steps / max(token_steps, 1) - 1}


# What `--structured-json` constrains every request to when no schema file is given: an API-style object with
# strings, numbers, an enum and a list of records long enough (minItems) that no output can close before
# max_tokens, so both runs generate the same tokens in the same steps and their throughputs compare directly.
BENCH_SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "kind": {"enum": ["report", "note", "list"]}, "score": {"type": "number"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "items": {"type": "array", "minItems": 1000, "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "count": {"type": "integer"}}, "required": ["name", "count"]}}},
    "required": ["title", "kind", "score", "tags", "items"]}


def measure_structured(llm, requests, schema_file: str, prompt_tokens: int, log: Callable[[str], None]) -> dict:
    """The same workload again with every request under a JSON schema: throughput, and the mask time."""
    from llminfer.engine.structured import StructuredOutput

    schema = BENCH_SCHEMA if schema_file == "builtin" else json.loads(Path(schema_file).read_text())
    spec = StructuredOutput(json=schema)
    masks = llm.engine.runner.masks
    before = (masks.masks, masks.mask_seconds, masks.wait_seconds)
    log("the same workload, each request under a JSON schema")
    # The first token changed: no prompt block hits the prefix cache the first run filled.
    vocab = llm.model_config.vocab_size
    fresh = [([(prompt[0] + 1) % vocab, *prompt[1:]], output_len) for prompt, output_len in requests]
    run = drive_workload(llm.engine, fresh, lambda _: {"structured": spec}, None, log)
    elapsed, output_tokens = run["elapsed"], sum(run["output_lengths"])
    count, seconds, waited = (after - b for after, b in zip((masks.masks, masks.mask_seconds, masks.wait_seconds),
                                                            before))
    return {"schema": schema_file, "output_tokens": output_tokens, "steps": run["steps"],
            "mask_ms_per_token": seconds / max(count, 1) * 1e3, "mask_wait_ms_per_step": waited / run["steps"] * 1e3,
            "result": ThroughputResult("llminfer (JSON schema)", elapsed, len(requests) / elapsed,
                                       output_tokens / elapsed, (prompt_tokens + output_tokens) / elapsed)}


def throughput_command(args: argparse.Namespace) -> int:
    from llminfer.engine import LLM

    log = _log
    log(f"loading {args.model} ({args.dtype}, {args.device}, {args.threads or available_cores()} threads)")
    llm = LLM(args.model, **model_options(args), max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=not args.no_prefix_caching)
    dtype = llm.config.dtype  # "auto" resolved
    if args.perplexity and llm.tokenizer is None:  # refused before the timed run
        from llminfer.errors import TokenizerError

        raise TokenizerError(f"{args.model}: has no tokenizer, so --perplexity has no text to score")
    requests = workload(args.dataset, args.num_prompts, args.input_len, args.output_len, args.prefix_len,
                        llm.model_config.vocab_size)
    prompts = [prompt for prompt, _ in requests]
    engine = llm.engine
    profile = StepProfile(engine) if args.profile else None
    run = drive_workload(engine, requests, lambda _: {}, profile, log)
    elapsed, first_token, finished, output_lengths, peak = (run["elapsed"], run["first_token"], run["finished"],
                                                           run["output_lengths"], run["peak"])
    steps = run["steps"]
    stats = llm.kv_cache_stats()
    prompt_tokens = sum(map(len, prompts))
    output_tokens = sum(output_lengths)
    results = [ThroughputResult("llminfer", elapsed, args.num_prompts / elapsed, output_tokens / elapsed,
                                (prompt_tokens + output_tokens) / elapsed)]
    tpot = [(finished[i] - first_token[i]) / (n - 1) for i, n in zip(map(str, range(len(requests))), output_lengths)
            if n > 1]
    contiguous_slots = min(args.num_prompts, args.max_num_seqs) * llm.engine.max_model_len
    report = {
        "model": args.model, "dtype": dtype, "device": args.device, "threads": torch.get_num_threads(),
        "omp_spin_count": os.environ.get("GOMP_SPINCOUNT", "libgomp's default"),
        "dataset": args.dataset, "num_prompts": args.num_prompts, "input_len": args.input_len,
        "prefix_len": args.prefix_len, "output_len": args.output_len, "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens, "prefix_caching": not args.no_prefix_caching,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "ttft_s": percentiles(list(first_token.values())), "tpot_s": percentiles(tpot),
        "kv_block_size": stats.block_size, "kv_blocks_total": stats.total_blocks,
        "kv_blocks_peak": stats.peak_used_blocks, "kv_slots_at_peak": peak["used_slots"],
        "kv_tokens_held_at_peak": peak["tokens_held"], "contiguous_reservation_slots": contiguous_slots,
        "kv_slot_overhead_mean": run["slot_overhead_mean"],
        "prefix_cache_hit_rate": stats.prefix_cache_hit_rate,
        "prefill_tokens_computed": prompt_tokens - stats.prefix_cache_hit_tokens,
        "preemptions": engine.scheduler.num_preemptions,
    }
    if profile is not None:
        report["step_profile"] = profile.report()
    if llm.tensor_parallel_size > 1:
        from llminfer.parallel.communication import communication

        report.update(tensor_parallel_size=llm.tensor_parallel_size,
                      communication_ms_per_step=communication.seconds / max(steps, 1) * 1e3,
                      communication_share=communication.seconds / elapsed)
    if args.structured_json is not None:
        report["structured"] = measure_structured(llm, requests, args.structured_json, prompt_tokens, log)
        results.append(report["structured"].pop("result"))
        report["structured"]["ratio_vs_unconstrained"] = (results[-1].output_tokens_per_s
                                                          / results[0].output_tokens_per_s)
    if args.perplexity:  # before the peer: its load may need the memory ours holds
        report["perplexity"] = perplexity_against_float32(llm, args, log)
    if args.compare == "hf":
        del llm, engine
        results.append(measure_transformers_throughput(args.model, args.hf_dtype or dtype, args.device, requests,
                                                       args.hf_batch_size, log))
        report["hf_dtype"] = args.hf_dtype or dtype
        report["ratio_vs_transformers"] = {"output_tokens_per_s": results[0].output_tokens_per_s
                                           / results[-1].output_tokens_per_s}
    report["results"] = [asdict(r) for r in results]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    shape = (f"input {args.input_len} (+{args.prefix_len} shared)  output {args.output_len}"
             if args.dataset == "fixed" else f"synthetic-chat: {prompt_tokens} prompt and {output_tokens} output "
             f"tokens (prompts {min(map(len, prompts))}-{max(map(len, prompts))}, outputs "
             f"{min(output_lengths)}-{max(output_lengths)})")
    print(f"model {args.model}  dtype {dtype}  threads {report['threads']} (spin {report['omp_spin_count']})  "
          f"prompts {args.num_prompts}  {shape}")
    _print_table(results, [("seconds", "seconds", ".1f"), ("req/s", "requests_per_s", ".2f"),
                           ("out tok/s", "output_tokens_per_s", ".1f"), ("total tok/s", "total_tokens_per_s", ".1f")])
    print("llminfer, every request queued at the start:")
    print_latency_percentiles(report)
    overhead = peak["used_slots"] / max(peak["tokens_held"], 1) - 1
    print(f"KV cache: peak {stats.peak_used_blocks} of {stats.total_blocks} blocks ({peak['used_slots']} slots for "
          f"{peak['tokens_held']} tokens held, {overhead:.1%} overhead; {report['kv_slot_overhead_mean']:.1%} averaged "
          f"over the run); contiguous per-request reservation of the full context: {contiguous_slots} slots")
    print(f"prefix cache: {stats.prefix_cache_hit_rate:.1%} of prompt tokens hit; prefill computed "
          f"{report['prefill_tokens_computed']} of {prompt_tokens} prompt tokens; preemptions {report['preemptions']}")
    if report.get("step_profile"):
        print_step_profile(report["step_profile"])
    if "tensor_parallel_size" in report:
        print(f"tensor parallel: {report['tensor_parallel_size']} ranks, rank 0 spent "
              f"{report['communication_ms_per_step']:.2f} ms per step in collectives "
              f"({report['communication_share']:.1%} of the run)")
    if "structured" in report:
        st = report["structured"]
        print(f"under a JSON schema: {st['ratio_vs_unconstrained']:.2f}x the unconstrained output tokens/s; masks "
              f"{st['mask_ms_per_token']:.3f} ms per token on the worker thread, the step waited "
              f"{st['mask_wait_ms_per_step']:.3f} ms for them ({st['output_tokens']} tokens, {st['steps']} steps)")
    if "ratio_vs_transformers" in report:
        print(f"llminfer / transformers output tokens/s: {report['ratio_vs_transformers']['output_tokens_per_s']:.2f}x")
    if "perplexity" in report:
        p = report["perplexity"]
        print(f"llminfer perplexity {p['ours']:.4f}: {p['delta']:+.2%} against float32 {p['float32']:.4f} "
              f"({p['tokens']} tokens of pydoc_data.topics, windows of {p['context_len']})")
    return 0


PERPLEXITY_TOKENS = 8192  # as docs/QUANTIZATION.md measures


def perplexity_against_float32(llm, args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    """The benchmarked configuration's perplexity on the first PERPLEXITY_TOKENS tokens of pydoc_data.topics, and
    the same model's in float32 without quantization, so that a speed is read beside what it costs in accuracy."""
    from llminfer.engine import LLM
    from llminfer.perplexity import default_text, perplexity

    ids = llm.tokenizer.encode(default_text(), add_special_tokens=False)[:PERPLEXITY_TOKENS]
    context_len = min(512, llm.engine.max_model_len - 1)
    log(f"perplexity: {len(ids)} tokens in windows of {context_len}, this configuration and float32")
    ours = perplexity(llm.model, ids, context_len).perplexity
    reference = LLM(args.model, **{**model_options(args), "dtype": "float32", "quantization": None,
                                   "kv_cache_dtype": "auto", "kv_cache_memory": "64MiB"})
    base = perplexity(reference.model, ids, context_len).perplexity
    return {"ours": ours, "float32": base, "delta": ours / base - 1, "tokens": len(ids), "context_len": context_len}


def measure_transformers_throughput(model_path: str, dtype: str, device: str, requests: list[tuple[list[int], int]],
                                    batch_size: int, log: Callable[[str], None]) -> ThroughputResult:
    """transformers' batched generate, left-padded, greedy, batch_size prompts at a time; a batch generates as many
    tokens as its longest request asks for, and only what each request asked for counts."""
    hf_model = load_transformers_model(model_path, dtype, device)
    pad = 0
    start = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        chunk = [prompt for prompt, _ in requests[first:first + batch_size]]
        new_tokens = max(n for _, n in requests[first:first + batch_size])
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.inference_mode():
            hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=None)
        log(f"transformers: {first + len(chunk)}/{len(requests)} prompts done")
    elapsed = time.perf_counter() - start
    output_tokens = sum(n for _, n in requests)
    total = sum(len(p) for p, _ in requests) + output_tokens
    return ThroughputResult("transformers", elapsed, len(requests) / elapsed, output_tokens / elapsed,
                            total / elapsed)
