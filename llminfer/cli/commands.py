"""What each `llminfer` subcommand does, once its arguments are parsed."""

from __future__ import annotations

import argparse
import os
import sys

from llminfer.cli.main import model_options, sampling_params
from llminfer.engine import LLM, SamplingParams
from llminfer.errors import RequestFailedError


def _load(args: argparse.Namespace) -> LLM:
    options = model_options(args)  # a bad option fails before the loading line
    if os.environ.get("RANK", "0") == "0":  # tensor-parallel followers stay quiet
        print(f"llminfer: loading {args.model} ...", file=sys.stderr, flush=True)
    return LLM(args.model, **options)


def _stream(llm: LLM, prompt, params: SamplingParams, interruptible: bool = False) -> str:
    """Print the reply as it streams; return its text. interruptible: Ctrl-C stops this reply (its request is
    aborted and what was generated is kept) instead of the program."""
    text = []
    stream = llm.stream(prompt, params)
    try:
        for output in stream:
            if output.delta:
                sys.stdout.write(output.delta)
                sys.stdout.flush()
                text.append(output.delta)
            if output.error is not None:
                sys.stdout.write("\n")
                raise RequestFailedError(output.error)
    except KeyboardInterrupt:
        if not interruptible:
            raise
        stream.close()  # aborts the request
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(text)


def generate(args: argparse.Namespace) -> int:
    sampling_params(args)  # validate before the slow load
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = _load(args)
    params = sampling_params(args, llm.sampling_defaults)  # what the flags leave out: the model's defaults
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        messages = [*system, {"role": "user", "content": prompt}]
        prompt = llm.chat_prompt(messages)
    _stream(llm, prompt, params)
    return 0


def chat(args: argparse.Namespace) -> int:
    sampling_params(args)
    llm = _load(args)
    params = sampling_params(args, llm.sampling_defaults)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            history.clear()
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        reply = _stream(llm, llm.chat_prompt(system + history), params, interruptible=True)
        history.append({"role": "assistant", "content": reply})


def info(args: argparse.Namespace) -> int:
    if args.ops:
        return _info_ops(args.device)
    from llminfer.loading import open_checkpoint

    checkpoint = open_checkpoint(args.model)
    config = checkpoint.config
    tokenizer = checkpoint.tokenizer()
    rows = [
        ("model", args.model),
        ("format", checkpoint.format),
        ("architecture", config.model_type),
        ("parameters", f"{config.num_parameters / 1e6:.1f}M"),
        ("layers", config.num_hidden_layers),
        ("hidden size", config.hidden_size),
        ("intermediate size", config.intermediate_size),
        ("attention heads", f"{config.num_attention_heads} (key/value heads: {config.num_key_value_heads}, "
                            f"head dim {config.head_dim})"),
        ("vocabulary", config.vocab_size),
        ("context length", config.max_position_embeddings),
        ("rope", f"theta={config.rope_theta:g}" + (f", scaling={config.rope_scaling}" if config.rope_scaling else "")),
        ("tied embeddings", config.tie_word_embeddings),
        ("sliding window", config.sliding_window or "none"),
        ("stored dtype", _stored_dtype(checkpoint)),
        ("quantization", _quantization_summary(checkpoint)),
        ("tokenizer", "none" if tokenizer is None else f"{tokenizer.vocab_size} tokens, chat template: "
                                                        f"{'yes' if tokenizer.chat_template else 'no'}"),
        ("sampling defaults", _sampling_summary(checkpoint.sampling_defaults())),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _info_ops(device: str) -> int:
    from llminfer.ops import describe_ops

    print(f"ops on {device} (choose with --ops OP=IMPL,...; * = chosen by default)")
    for row in describe_ops(device):
        impls = []
        for impl in row["implementations"]:
            mark = "*" if impl["name"] == row["chosen"] else " "
            state = "available" if impl["unavailable"] is None else f"unavailable: {impl['unavailable']}"
            impls.append(f"    {mark} {impl['name']:<12} priority {impl['priority']:<3} {state}")
        print(f"{row['op']}: {row['doc']}")
        print("\n".join(impls))
    return 0


def _sampling_summary(model_defaults: dict) -> str:
    from llminfer.loading.sampling_defaults import cli_defaults

    values = ", ".join(f"{name} {value:g}" for name, value in cli_defaults(model_defaults).items())
    if model_defaults:
        return f"{values} (the model's generation config; the server applies them too)"
    return f"{values} (llama.cpp's, for generate, chat and the chat page: the model has none)"


def _quantization_summary(checkpoint) -> str:
    quantization = checkpoint.quantization_config()
    if quantization is None:
        return "none"
    kv = ", kv cache int8" if quantization.kv_cache_dtype == "int8" else ""
    return f"{quantization.describe()}, compute {quantization.compute_dtype}{kv}"


def _stored_dtype(checkpoint) -> str:
    if checkpoint.format == "gguf":
        from collections import Counter

        counts = Counter(t.tensor_type.name for t in checkpoint.reader.tensors)
        return "GGUF " + ", ".join(f"{name} x{n}" for name, n in counts.most_common())
    return checkpoint.config.torch_dtype


def convert(args: argparse.Namespace) -> int:
    from llminfer.loading.convert import convert_checkpoint

    destination = convert_checkpoint(args.source, args.output, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                                     overwrite=args.overwrite)
    files = [f for f in destination.iterdir() if f.is_file()]
    print(f"converted {args.source} -> {destination} ({args.dtype}): {len(files)} files, "
          f"{sum(f.stat().st_size for f in files) / 1e6:.1f} MB")
    return 0


def export(args: argparse.Namespace) -> int:
    from llminfer.errors import require_modules

    require_modules("llminfer export", ["onnx", "onnxscript", "onnxruntime"], "pip install 'llminfer[export]'")
    from llminfer.export.onnx import export_onnx

    destination = export_onnx(args.source, args.output, dtype=args.dtype, opset=args.opset,
                              quantization=args.quantization, overwrite=args.overwrite, all_logits=args.all_logits)
    print(f"exported {args.source} -> {destination} (onnx, {args.dtype}"
          f"{', ' + args.quantization if args.quantization else ''}); run it with: "
          f"llminfer-lite generate --model {destination} PROMPT")
    return 0


def quantize(args: argparse.Namespace) -> int:
    """`llminfer quantize`: load a float checkpoint, quantize it, save it. Validates everything before the
    (slow) load, and writes nothing unless it all succeeds."""
    from pathlib import Path

    from llminfer.errors import ConfigError
    from llminfer.loading import open_checkpoint
    from llminfer.loading.convert import check_destination
    from llminfer.model.auto import load_model
    from llminfer.perplexity import read_text_file
    from llminfer.quantization import PTQConfig, quantizer_for, save_quantized
    from llminfer.schemes import QUANTIZATION_SCHEMES

    source, destination, scheme, group_size = args.source, args.output, args.scheme, args.group_size
    algorithm, calibration_file = args.algorithm, args.calibration
    group_sizes = QUANTIZATION_SCHEMES[scheme].group_sizes
    if group_sizes and group_size is None:
        raise ConfigError(f"--scheme {scheme} needs --group-size ({', '.join(map(str, group_sizes))})")
    config = PTQConfig.for_scheme(scheme, group_size=group_size, algorithm=algorithm, kv_dtype=args.kv_cache_dtype,
                                  compute_dtype=args.dtype, calibration_tokens=args.calibration_tokens,
                                  smoothquant_alpha=args.smoothquant_alpha)
    quantizer = quantizer_for(config)
    if calibration_file is not None and not quantizer.needs_calibration:
        raise ConfigError(f"--calibration is used by gptq and smoothquant, not by {algorithm}")
    text = read_text_file(calibration_file, "calibration file") if calibration_file is not None else None
    check_destination(Path(destination), args.overwrite)  # before the slow load, not only when writing
    checkpoint = open_checkpoint(source)
    if checkpoint.quantization_config() is not None:
        raise ConfigError(f"{source}: already quantized ({checkpoint.quantization_config().describe()}); "
                          "quantize the float checkpoint")
    for name, width in (("hidden_size", checkpoint.config.hidden_size),
                        ("intermediate_size", checkpoint.config.intermediate_size)):
        if group_size is not None and width % group_size:
            valid = ", ".join(str(g) for g in group_sizes if _divides_all(checkpoint, g))
            raise ConfigError(f"{source}: group size {group_size} does not divide {name} = {width} "
                              f"(valid here: {valid})")
    print(f"llminfer: loading {source} ...", file=sys.stderr, flush=True)
    model = load_model(checkpoint, "float32")
    quantizer.apply(model, calibration=text, calibration_source=calibration_file)
    quantizer.convert(model)
    save_quantized(model, destination, overwrite=args.overwrite, source=source)
    print(f"quantized {source} -> {destination} ({scheme}, {algorithm})")
    return 0


def _divides_all(checkpoint, group_size: int) -> bool:
    config = checkpoint.config
    return not (config.hidden_size % group_size or config.intermediate_size % group_size
                or (config.num_attention_heads * config.head_dim) % group_size)


def shard(args: argparse.Namespace) -> int:
    from llminfer.parallel.shard import shard_checkpoint

    destination = shard_checkpoint(args.source, args.output, args.ranks, dtype=args.dtype,
                                   overwrite=args.overwrite)
    print(f"sharded {args.source} -> {destination} ({args.ranks} ranks)")
    return 0


def perplexity(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from llminfer import perplexity as scoring
    from llminfer.errors import ConfigError, TokenizerError

    text = scoring.read_text_file(args.text_file, "text file") if args.text_file else scoring.default_text()
    print(f"llminfer: loading {args.model} ...", file=sys.stderr, flush=True)
    # Through LLM, so that --tensor-parallel-size N scores with N ranks (the others follow rank 0's steps).
    llm = LLM(args.model, **model_options(args), enable_prefix_caching=False,
              max_num_batched_tokens=max(2048, args.context_len))
    context = llm.engine.max_model_len
    if args.context_len >= context:
        raise ConfigError(f"--context-len {args.context_len} does not fit the model's context of {context} tokens "
                          f"(each window is prefilled whole; use --context-len {context - 1} or less)")
    if llm.tokenizer is None:
        raise TokenizerError(f"{args.model}: has no tokenizer, so no text can be scored")
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    with tqdm(total=-(-len(ids) // args.context_len), desc="windows", unit="win", file=sys.stderr,
              disable=args.json) as bar:
        result = scoring.perplexity(llm.model, ids, args.context_len, progress=lambda done, total: bar.update(1),
                            engine=llm.engine)
    kv_dtype = llm.engine.kv_cache_dtype
    model = llm.model
    dtype = str(model.dtype).replace("torch.", "")
    scheme = model.quantization.describe() if model.quantization else None
    report = {"model": args.model, "dtype": dtype, "quantization": scheme, "kv_cache_dtype": kv_dtype,
              "text": args.text_file or "pydoc_data.topics", **vars(result)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.tokens_scored} tokens ({result.windows} windows of "
              f"{result.context_len}, {report['text']}, {dtype}{', ' + scheme if scheme else ''}, kv {kv_dtype}) "
              f"in {result.seconds:.1f} s")
    return 0
