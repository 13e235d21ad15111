"""The `llminfer` command: generate, chat, info, convert, serve, bench.

Errors print as one line on stderr with exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from llminfer.errors import LLMInferError
from llminfer.loading.default_models import DEFAULT_MODEL
from llminfer.schemes import ALGORITHMS, DTYPE_NAMES, KV_CACHE_DTYPES, QUANTIZATION_SCHEMES

GROUP_SIZES = sorted({g for scheme in QUANTIZATION_SCHEMES.values() for g in scheme.group_sizes})

logger = logging.getLogger("llminfer")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="llminfer: %(message)s")
    parallel = getattr(args, "tensor_parallel_size", 1) > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if parallel and (getattr(args, "compare_with", None) or getattr(args, "compare", None)):
        parser.error("--compare-with / --compare measure several engines in one run: run each model with "
                     "--tensor-parallel-size on its own")
    if getattr(args, "tensor_parallel_size", 1) > 1 and "WORLD_SIZE" not in os.environ:
        from llminfer.parallel.launch import check_launchable, launch

        # A size the model cannot be split by is one line from here, not one line from each rank.
        checked = run_handler(argparse.Namespace(handler=lambda _: check_launchable(args), debug=args.debug),
                              "llminfer")
        return checked or launch(argv, args.tensor_parallel_size)
    return run_handler(args, "llminfer")


def run_handler(args: argparse.Namespace, program: str) -> int:
    """Run the chosen command: our errors become one line on stderr and exit code 2 (--debug: a traceback)."""
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (LLMInferError, OSError) as exc:
        if args.debug:
            raise
        print(f"{program}: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llminfer", description="Run Llama-family language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate text from a prompt (streamed)")
    _model_arguments(generate)
    add_sampling_arguments(generate)
    add_prompt_arguments(generate)
    generate.set_defaults(handler=_lazy("llminfer.cli.commands", "generate"))

    chat = commands.add_parser("chat", help="interactive chat (/reset clears history, /exit or Ctrl-D quits)")
    _model_arguments(chat)
    add_sampling_arguments(chat)
    chat.add_argument("--system", help="system message")
    chat.set_defaults(handler=_lazy("llminfer.cli.commands", "chat"))

    info = commands.add_parser("info", help="print a model's architecture, sizes and dtype")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    info.add_argument("--ops", action="store_true", help="list every op, its implementations, which run on this "
                                                         "device and which is chosen (no model is read)")
    info.add_argument("--device", default="cpu", help="the device --ops resolves for (default: cpu)")
    info.set_defaults(handler=_lazy("llminfer.cli.commands", "info"))

    convert = commands.add_parser("convert", help="convert an HF folder or GGUF file to llminfer's format")
    convert.add_argument("source", help="HF model folder, .gguf file, hub id or alias")
    convert.add_argument("-o", "--output", required=True, help="destination folder (must not exist or be empty)")
    convert.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES)
    convert.add_argument("--max-shard-size", type=_size, default="2GB", help="largest safetensors shard (e.g. 500MB)")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    convert.set_defaults(handler=_lazy("llminfer.cli.commands", "convert"))

    shard = commands.add_parser("shard", help="split a checkpoint per tensor-parallel rank, offline")
    shard.add_argument("source", help="HF model folder, .gguf file, converted folder, hub id or alias")
    shard.add_argument("--tp", "--tensor-parallel-size", dest="ranks", type=positive_int, required=True,
                       help="number of ranks to split for")
    shard.add_argument("-o", "--output", required=True, help="destination folder (must not exist or be empty)")
    shard.add_argument("--dtype", choices=DTYPE_NAMES, help="default: as stored")
    shard.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    shard.set_defaults(handler=_lazy("llminfer.cli.commands", "shard"))

    export = commands.add_parser("export", help="export to ONNX for the lite runtime (llminfer-lite, no PyTorch)")
    export.add_argument("source", help="HF model folder, .gguf file, converted or A16W8-quantized folder, alias")
    export.add_argument("-o", "--output", required=True, help="destination folder (must not exist or be empty)")
    export.add_argument("--format", default="onnx", choices=["onnx"])
    export.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    export.add_argument("--opset", type=positive_int, default=18, help="ONNX opset (18 to 23; default 18)")
    export.add_argument("--quantization", choices=[s.name for s in QUANTIZATION_SCHEMES.values() if s.exportable],
                        help="quantize a float checkpoint (round-to-nearest) before exporting")
    export.add_argument("--all-logits", action="store_true",
                        help="output logits at every position (for scoring), not only the last (for generation)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    export.set_defaults(handler=_lazy("llminfer.cli.commands", "export"))

    quantize = commands.add_parser("quantize", help="post-training quantization of a float checkpoint")
    quantize.add_argument("source", help="HF model folder, .gguf file, converted folder, hub id or alias")
    quantize.add_argument("-o", "--output", required=True, help="destination folder (must not exist or be empty)")
    quantize.add_argument("--scheme", required=True, choices=list(QUANTIZATION_SCHEMES))
    quantize.add_argument("--group-size", type=int, choices=GROUP_SIZES,
                          help="a grouped scheme (a16w4): inputs per scale group")
    quantize.add_argument("--algorithm", default="rtn", choices=ALGORITHMS,
                          help="rtn: round-to-nearest; gptq: error-compensating (a16w4, calibrated); "
                               "smoothquant: activation-outlier migration (a8w8, calibrated)")
    quantize.add_argument("--calibration", help="UTF-8 text file for calibration (default: Python's stdlib "
                                                "docstrings, never the perplexity text)")
    quantize.add_argument("--calibration-tokens", type=positive_int, default=16384)
    quantize.add_argument("--smoothquant-alpha", type=float, default=0.5)
    quantize.add_argument("--kv-cache-dtype", choices=[d for d in KV_CACHE_DTYPES if d != "auto"],
                          help="record this KV-cache dtype as the default")
    quantize.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES,
                          help="compute dtype of the quantized model")
    quantize.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    quantize.set_defaults(handler=_lazy("llminfer.cli.commands", "quantize"))

    ppl = commands.add_parser("perplexity", help="perplexity over a text (default: Python's pydoc topics)")
    _model_arguments(ppl)
    ppl.add_argument("--text-file", help="UTF-8 text to score (default: pydoc_data.topics, shipped with Python)")
    ppl.add_argument("--context-len", type=positive_int, default=512, help="tokens per scored window")
    ppl.add_argument("--max-tokens", type=positive_int, help="score only the first N tokens of the text")
    ppl.add_argument("--json", action="store_true", help="print JSON instead of a line")
    ppl.set_defaults(handler=_lazy("llminfer.cli.commands", "perplexity"))

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server with a chat page at /")
    _model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set LLMINFER_API_KEY)")
    serve.add_argument("--served-model-name", help="the model id clients send (default: --model, or the name of "
                                                   "its file or folder)")
    serve.add_argument("--generation-config", choices=("auto", "none"), default="auto",
                       help="auto: sampling fields a request leaves out take the model's generation_config.json "
                            "values (as vLLM); none: OpenAI's defaults (default: auto)")
    serve.add_argument("--max-queued", type=positive_int, default=256,
                       help="waiting engine requests (prompts x n) beyond this are answered 503 with Retry-After "
                            "(default: %(default)s)")
    serve.add_argument("--max-batch-prompts", type=positive_int, default=256,
                       help="prompts one /v1/completions request may carry; more get 400 (default: %(default)s)")
    serve.add_argument("--max-num-seqs", type=positive_int, default=64, help="requests in one running batch")
    serve.add_argument("--max-num-batched-tokens", type=positive_int, default=2048, help="tokens per engine step")
    serve.add_argument("--no-prefix-caching", action="store_true")
    serve.add_argument("--max-n", type=positive_int, default=16, help="largest 'n' (choices per request) accepted")
    serve.add_argument("--max-body-size", type=_size, default="4MB", help="larger request bodies get 413")
    serve.add_argument("--body-timeout", type=float, default=30.0,
                       help="seconds a client may take to send its request body; then 408 (default: %(default)s)")
    serve.add_argument("--max-connections", type=positive_int, default=512,
                       help="open connections at most; more get 503 at once (default: %(default)s)")
    serve.add_argument("--keep-alive-timeout", type=float, default=None,
                       help="seconds an idle keep-alive connection stays open (default: 20, longer than the "
                            "common clients' own idle expiry)")
    serve.add_argument("--drain-timeout", type=float, default=300.0,
                       help="seconds SIGTERM waits for requests in flight before exiting")
    serve.set_defaults(handler=_lazy("llminfer.cli.serve", "serve_command"))

    bench = commands.add_parser("bench", help="benchmarks")
    bench_kinds = bench.add_subparsers(dest="bench", required=True)
    latency = bench_kinds.add_parser("latency", help="prefill tokens/s, decode tokens/s and time to first token")
    _model_arguments(latency)
    latency.add_argument("--input-len", type=positive_int, default=128)
    latency.add_argument("--output-len", type=positive_int, default=64)
    latency.add_argument("--batch-size", type=positive_int, default=1)
    latency.add_argument("--iters", type=positive_int, default=3, help="timed repetitions (median reported)")
    latency.add_argument("--compare", choices=["hf", "llama.cpp"],
                         help="also run Hugging Face transformers on the same weights, or llama.cpp on the same GGUF "
                              "(llama-cpp-python: pip install -e '.[bench]')")
    latency.add_argument("--compare-with", nargs="+", default=[], metavar="MODEL",
                         help="also measure these models (quantized folders, or ONNX exports on the lite runtime) "
                              "with the same prompts; ratios are "
                              "to --model")
    latency.add_argument("--json", action="store_true", help="print JSON instead of a table")
    latency.set_defaults(handler=_lazy("llminfer.cli.bench", "latency_command"))
    throughput = bench_kinds.add_parser("throughput", help="requests/s and tokens/s of a many-request workload")
    _model_arguments(throughput)
    throughput.add_argument("--num-prompts", type=positive_int, default=64)
    throughput.add_argument("--input-len", type=positive_int, default=128)
    throughput.add_argument("--output-len", type=positive_int, default=128)
    throughput.add_argument("--prefix-len", type=int, default=0, help="tokens shared by every prompt, before its own")
    throughput.add_argument("--dataset", choices=["fixed", "synthetic-chat"], default="fixed",
                            help="fixed: --input-len / --output-len for every request; synthetic-chat: fixed-seed "
                                 "lengths, prompts 16-1024 tokens and outputs 16-512 (default: %(default)s)")
    throughput.add_argument("--max-num-seqs", type=positive_int, default=64)
    throughput.add_argument("--max-num-batched-tokens", type=positive_int, default=2048,
                            help="tokens per engine step, as llminfer serve's flag (default: %(default)s)")
    throughput.add_argument("--no-prefix-caching", action="store_true")
    throughput.add_argument("--compare", choices=["hf"], help="also run transformers' batched generate")
    throughput.add_argument("--hf-batch-size", type=positive_int, default=64, help="prompts per transformers batch")
    throughput.add_argument("--perplexity", action="store_true",
                            help="also print this configuration's perplexity against float32's (pydoc_data.topics)")
    throughput.add_argument("--hf-dtype", choices=["float32", "bfloat16"],
                            help="transformers' dtype (default: ours), to compare each engine's best on this CPU")
    throughput.add_argument("--structured-json", nargs="?", const="builtin", metavar="SCHEMA.json",
                            help="then the same requests, each under a JSON schema (default: a built-in API-style "
                                 "object): its throughput, the ratio, and the mask time per token")
    throughput.add_argument("--profile", action="store_true",
                            help="also time each phase of the pure-decode steps at the widest batch (schedule, "
                                 "inputs, forward, sampler, updates)")
    throughput.add_argument("--json", action="store_true", help="print JSON instead of a table")
    throughput.set_defaults(handler=_lazy("llminfer.cli.bench", "throughput_command"))
    serve_bench = bench_kinds.add_parser("serve", help="load a running server with streaming requests")
    serve_bench.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    serve_bench.add_argument("--model", help="model id to send (default: whatever the server serves)")
    serve_bench.add_argument("--api-key", help="bearer token, if the server needs one")
    serve_bench.add_argument("--num-prompts", type=positive_int, default=64)
    serve_bench.add_argument("--concurrency", type=positive_int, default=32, help="requests in flight at once")
    serve_bench.add_argument("--input-len", type=positive_int, default=128)
    serve_bench.add_argument("--output-len", type=positive_int, default=128)
    serve_bench.add_argument("--dataset", choices=["fixed", "synthetic-chat"], default="fixed",
                             help="as in bench throughput (default: %(default)s)")
    serve_bench.add_argument("--vocab-size", type=positive_int, default=49152,
                             help="range of the random prompt token ids (default: the default model's vocabulary, "
                                  "so the prompts equal bench throughput's)")
    serve_bench.add_argument("--compare", choices=["llama-server"],
                             help="then the same requests against a llama-server bench starts (see --llama-server)")
    serve_bench.add_argument("--llama-server", metavar="PATH", help="the llama-server binary (default: on PATH)")
    serve_bench.add_argument("--gguf", default=DEFAULT_MODEL,
                             help="the GGUF (file or alias) llama-server runs (default: %(default)s)")
    serve_bench.add_argument("--llama-server-port", type=positive_int, default=8091)
    serve_bench.add_argument("--threads", type=positive_int,
                             help="llama-server's threads (default: the cores this process may use)")
    serve_bench.add_argument("--json", action="store_true", help="print JSON instead of text")
    serve_bench.set_defaults(handler=_lazy("llminfer.cli.bench_serve", "serve_benchmark_command"))
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL,
                        help=f"alias, HF folder, .gguf file, converted folder or hub id (default: {DEFAULT_MODEL})")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                        help="compute dtype (auto: float32, or bfloat16 for quantized models)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--max-model-len", type=positive_int, help="cap on prompt + generated tokens")
    parser.add_argument("--kv-cache-memory", help="KV cache budget: a size (2GiB, 512MB) or a fraction of free "
                                                  "memory (0.3); default: a tenth of free RAM up to 2GiB on CPU")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="int8: keys and values stored as int8 with per-token, per-head scales (auto: the "
                             "model's dtype, or what a quantized checkpoint recorded)")
    parser.add_argument("--quantization", choices=list(QUANTIZATION_SCHEMES),
                        help="quantize a float checkpoint at load (round-to-nearest; a16w4 uses groups of 32); "
                             "for GPTQ, SmoothQuant or other group sizes use `llminfer quantize`")
    parser.add_argument("--ops", metavar="OP=IMPL,...",
                        help="op implementations, e.g. rms_norm=reference,paged_decode_attention=batched "
                             "(default: the best available on the device; see `llminfer info --ops`)")
    parser.add_argument("--threads", type=positive_int,
                        help="CPU threads (default: the cores this process may run on; split among "
                             "tensor-parallel ranks)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run every step through the Python network (default: CPU decode steps are recorded "
                             "once per batch size and replayed from C++)")
    parser.add_argument("--tensor-parallel-size", "--tp", type=positive_int, default=1,
                        help="run as N processes that each hold 1/N of the weights and KV cache (started here; "
                             "or start them with torchrun --nproc-per-node N -m llminfer ...)")


def model_options(args: argparse.Namespace) -> dict:
    """The LLM(...) keyword arguments that _model_arguments defines (--ops checked here, before any load)."""
    from llminfer.ops import parse_ops_spec

    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun the flag may be left out
    return {"dtype": args.dtype, "device": args.device, "max_model_len": args.max_model_len,
            "kv_cache_memory": args.kv_cache_memory, "kv_cache_dtype": args.kv_cache_dtype,
            "quantization": args.quantization, "tensor_parallel_size": max(args.tensor_parallel_size, world),
            "ops": parse_ops_spec(args.ops), "threads": args.threads, "enforce_eager": args.enforce_eager}


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    model = "default: the model's generation_config.json, else llama.cpp's"
    parser.add_argument("--max-new-tokens", "-n", type=int, default=256, help="tokens to generate at most "
                                                                              "(default: 256)")
    parser.add_argument("--temperature", "-t", type=float, help=f"0 is greedy ({model} 0.8)")
    parser.add_argument("--top-k", type=int, help=f"0 is off ({model} 40)")
    parser.add_argument("--top-p", type=float, help=f"1 is off ({model} 0.95)")
    parser.add_argument("--min-p", type=float, help=f"0 is off ({model} 0.05)")
    parser.add_argument("--repetition-penalty", type=float, help="1 is off (default: the model's, else 1)")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="(default: 0)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="(default: 0)")
    parser.add_argument("--stop", action="append", default=[], type=unescape,
                        help="stop string (repeatable; escapes as in llama.cpp: --stop '\\n\\n')")
    parser.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def unescape(text: str) -> str:
    """Backslash escapes in a command-line string, as llama.cpp reads them (\\n, \\t, \\r, \\\\, quotes);
    any other backslash stays as written."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """generate's prompt options (llminfer and llminfer-lite take the same)."""
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--system", help="system message, with --chat")
    parser.add_argument("prompt", help="the prompt text ('-' reads standard input)")


def sampling_params(args: argparse.Namespace, model_defaults: dict | None = None):
    """The SamplingParams that add_sampling_arguments describe (validated: a bad value is a one-line error).
    What the command line leaves out comes from the model's sampling defaults, else llama.cpp's."""
    from llminfer.engine.sampling_params import SamplingParams
    from llminfer.loading.sampling_defaults import cli_defaults

    if args.max_new_tokens < 1:  # 0 scores a prompt in the API; generating nothing is no use here
        from llminfer.errors import InvalidSamplingParamsError

        raise InvalidSamplingParamsError(f"invalid sampling parameter max_tokens={args.max_new_tokens}: expected an "
                                         "integer >= 1", field="max_tokens")
    defaults = cli_defaults(model_defaults or {})
    chosen = {name: getattr(args, name) if getattr(args, name) is not None else defaults.get(name)
              for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")}
    chosen = {name: value for name, value in chosen.items() if value is not None}
    if args.greedy:
        chosen["temperature"] = 0.0
    return SamplingParams(max_tokens=args.max_new_tokens, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, stop=args.stop, seed=args.seed, **chosen)


def _lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    # Import torch and friends only for the command that runs: `llminfer --help` stays instant.
    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), function)(args)

    return run


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            try:
                return int(float(upper[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(upper)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 500MB or 2GB, got '{text}'") from None


if __name__ == "__main__":
    sys.exit(main())
