"""`llminfer bench latency`: prefill tokens/s, decode tokens/s and time to first token.

Both engines get the same random prompt ids, greedy decoding and no early stop; each run is
repeated and the median reported. With `--compare hf`, Hugging Face transformers runs the same
weights in the same process, so the ratio is measured under identical conditions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass
class LatencyResult:
    engine: str
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    ttft_ms: float


def _median_result(engine: str, runs: list[tuple[float, float]], input_tokens: int, output_tokens: int) -> LatencyResult:
    ttft = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return LatencyResult(engine, input_tokens / ttft, (output_tokens - 1) / decode if output_tokens > 1 else 0.0,
                         ttft * 1e3)


def measure_llminfer(llm, prompts: list[list[int]], output_len: int, iters: int,
                     log: Callable[[str], None]) -> LatencyResult:
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
    return _median_result("llminfer", runs, sum(map(len, prompts)), output_len * len(prompts))


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


def load_transformers_model(model: str, dtype: str, device: str):
    """The same checkpoint in Hugging Face transformers (test/bench peer only)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        from llminfer.errors import LLMInferError

        raise LLMInferError("--compare hf needs transformers (pip install transformers accelerate gguf)") from None
    from pathlib import Path

    from llminfer.loading import open_checkpoint

    checkpoint = open_checkpoint(model)
    kwargs = {"dtype": getattr(torch, dtype)}
    if checkpoint.format == "gguf":
        path = Path(checkpoint.path)
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs).to(device).eval()
    return AutoModelForCausalLM.from_pretrained(str(checkpoint.path), **kwargs).to(device).eval()


def latency_command(args: argparse.Namespace) -> int:
    from llminfer.engine import LLM

    def log(message: str) -> None:
        print(f"llminfer: {message}", file=sys.stderr, flush=True)

    log(f"loading {args.model} ({args.dtype}, {args.device}, {torch.get_num_threads()} threads)")
    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              max_num_seqs=args.batch_size)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, llm.model_config.vocab_size - 100, (args.batch_size, args.input_len),
                            generator=generator).tolist()
    results = [measure_llminfer(llm, prompts, args.output_len, args.iters, log)]
    if args.compare == "hf":
        del llm
        results.append(measure_transformers(args.model, args.dtype, args.device, prompts, args.output_len,
                                            args.iters, log))
    report = {
        "model": args.model, "dtype": args.dtype, "device": args.device, "threads": torch.get_num_threads(),
        "batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
        "results": [asdict(r) for r in results],
    }
    if len(results) == 2:
        ours, peer = results
        report["ratio_vs_transformers"] = {
            "prefill": ours.prefill_tokens_per_s / peer.prefill_tokens_per_s,
            "decode": ours.decode_tokens_per_s / peer.decode_tokens_per_s,
            "ttft": peer.ttft_ms / ours.ttft_ms,
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {args.model}  dtype {args.dtype}  device {args.device}  threads {report['threads']}  "
          f"batch {args.batch_size}  input {args.input_len}  output {args.output_len}")
    print(f"{'engine':<14}{'prefill tok/s':>15}{'decode tok/s':>15}{'TTFT ms':>10}")
    for r in results:
        print(f"{r.engine:<14}{r.prefill_tokens_per_s:>15.1f}{r.decode_tokens_per_s:>15.1f}{r.ttft_ms:>10.1f}")
    if "ratio_vs_transformers" in report:
        ratio = report["ratio_vs_transformers"]
        print(f"llminfer / transformers: prefill {ratio['prefill']:.2f}x, decode {ratio['decode']:.2f}x, "
              f"TTFT {ratio['ttft']:.2f}x faster")
    return 0
