"""`llminfer-lite generate|bench --model DST ...`: the lite runtime from the command line (no PyTorch)."""

from __future__ import annotations

import argparse
import json
import sys

from llminfer.cli.main import (
    add_prompt_arguments,
    add_sampling_arguments,
    positive_int,
    run_handler,
    sampling_params,
)


def main(argv: list[str] | None = None) -> int:
    return run_handler(build_parser().parse_args(argv), "llminfer-lite")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llminfer-lite", description="Run a model exported by `llminfer export` "
                                     "on onnxruntime (no PyTorch).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate text from a prompt (streamed)")
    _model_arguments(generate)
    add_sampling_arguments(generate)
    add_prompt_arguments(generate)
    generate.set_defaults(handler=generate_command)

    bench = commands.add_parser("bench", help="prefill and decode tokens/s at batch 1")
    _model_arguments(bench)
    bench.add_argument("--input-len", type=positive_int, default=128)
    bench.add_argument("--output-len", type=positive_int, default=64)
    bench.add_argument("--iters", type=positive_int, default=3)
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.set_defaults(handler=bench_command)
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", required=True, help="a folder written by `llminfer export`")
    parser.add_argument("--threads", type=positive_int, help="onnxruntime intra-op threads (default: all cores)")
    parser.add_argument("--verify", action="store_true", help="check every file's sha256 against export.json")


def _load(args: argparse.Namespace):
    from llminfer.errors import require_modules

    require_modules("llminfer-lite", ["onnxruntime"],
                    "pip install onnxruntime (or pip install -r requirements-lite.txt)")
    from llminfer.lite.model import LiteModel

    print(f"llminfer-lite: loading {args.model} ...", file=sys.stderr, flush=True)
    return LiteModel(args.model, threads=args.threads, verify=args.verify)


def generate_command(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # validate before loading
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = _load(args)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompt = model.chat_prompt([*system, {"role": "user", "content": prompt}])
    for output in model.stream(prompt, params):
        if output.delta:
            sys.stdout.write(output.delta)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def bench_command(args: argparse.Namespace) -> int:
    import numpy as np

    from llminfer.engine.sampling_params import SamplingParams

    model = _load(args)
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, model.vocab_size - 100, args.input_len).tolist()
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    list(model.stream(prompt, SamplingParams(max_tokens=2, temperature=0.0)))  # warm-up
    prefill, decode = [], []
    for run in range(args.iters):
        list(model.stream(prompt, params))
        times = model.last_times
        prefill.append(times.prompt_tokens / times.prefill_seconds)
        decode.append(len(times.decode_seconds) / sum(times.decode_seconds))
        print(f"llminfer-lite: run {run + 1}/{args.iters}: ttft {times.prefill_seconds * 1000:.0f} ms, decode "
              f"{sum(times.decode_seconds):.2f} s", file=sys.stderr)
    folder_bytes = sum(p.stat().st_size for p in model.folder.iterdir() if p.is_file())
    report = {"model": args.model, "dtype": model.manifest["dtype"], "quantization": model.manifest.get("quantization"),
              "backend": "onnxruntime", "threads": args.threads, "input_len": args.input_len,
              "output_len": args.output_len, "prefill_tokens_per_s": float(np.median(prefill)),
              "decode_tokens_per_s": float(np.median(decode)), "folder_mb": round(folder_bytes / 1e6, 1)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"model {args.model}  {report['dtype']}{', ' + report['quantization'] if report['quantization'] else ''}"
              f"  onnxruntime  input {args.input_len}  output {args.output_len}  folder {report['folder_mb']} MB")
        print(f"{'engine':<16}{'prefill tok/s':>14}{'decode tok/s':>15}")
        print(f"{'llminfer-lite':<16}{report['prefill_tokens_per_s']:>14.1f}{report['decode_tokens_per_s']:>15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
