"""`llminfer export SRC -o DST`: the network as an ONNX graph, ready for the lite runtime (no PyTorch needed).

DST holds
    model.onnx, model.onnx.data   one step graph (see graph.py), weights as ONNX external data; logits at the
                                  last position (or, with all_logits, at every new position)
    tokenizer.json, tokenizer_config.json (chat template), generation_config.json (stop ids, context length)
    export.json                   the manifest: source and its sha256, opset, dtype, quantization, the graph's
                                  inputs and outputs (names, element types, shapes), the model's sizes, every
                                  file with its size and sha256, and the largest difference from PyTorch measured
Nothing is reported as exported before the ONNX checker has passed and onnxruntime's outputs on sample prefill and
decode inputs match PyTorch's; the folder is written beside DST and renamed into place only then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

from llminfer.errors import ConfigError, UnsupportedModelError
from llminfer.export.graph import EXPORTABLE_SCHEMES, DecoderStep
from llminfer.files import file_sha256
from llminfer.lite.model import EXPORT_FORMAT, EXPORT_MANIFEST

logger = logging.getLogger(__name__)

GRAPH_FILE = "model.onnx"
EXPORT_DTYPES = ("float32", "float16")
DEFAULT_OPSET = 18
# worst |onnxruntime - PyTorch| on the sample logits, relative to their largest magnitude
TOLERANCE = {"float32": 1e-3, "float16": 3e-2}


def export_onnx(source: str, destination: str | Path, dtype: str = "float32", opset: int = DEFAULT_OPSET,
                quantization: str | None = None, overwrite: bool = False, all_logits: bool = False) -> Path:
    from llminfer.loading import open_checkpoint
    from llminfer.loading.convert import check_destination, staged_folder
    from llminfer.model.auto import load_model
    from llminfer.ops import reference_ops

    destination = Path(destination)
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype '{dtype}' cannot be exported (expected one of {', '.join(EXPORT_DTYPES)})")
    if not 18 <= opset <= 23:  # torch.onnx's dynamo exporter writes opset 18 at the least
        raise ConfigError(f"--opset {opset} is not supported (expected 18 to 23)")
    check_destination(destination, overwrite)  # before the slow part
    checkpoint = open_checkpoint(source)
    stored = checkpoint.quantization_config()
    scheme = stored.scheme if stored else quantization
    if scheme is not None and scheme not in EXPORTABLE_SCHEMES:
        what = f"is quantized as {stored.describe()}" if stored else f"--quantization {scheme} was asked for"
        raise UnsupportedModelError(f"{source}: {what}; ONNX export supports float models and "
                                    f"{', '.join(EXPORTABLE_SCHEMES)}")
    if getattr(checkpoint, "tensor_parallel_size", 1) > 1:
        raise UnsupportedModelError(f"{source}: is sharded for tensor parallelism; export the unsharded checkpoint")
    _progress(f"loading {source} ({dtype}{', ' + scheme if scheme else ''})")
    model = load_model(checkpoint, dtype, "cpu", quantization, ops=reference_ops("cpu"))  # plain ops trace
    tokenizer = model.tokenizer
    if tokenizer is None:
        logger.warning("%s has no tokenizer: the export will take token ids only", source)
    step = DecoderStep(model, all_logits).eval()
    names = io_names(model.config.num_hidden_layers)
    with staged_folder(destination, overwrite) as staging:
        graph = staging / GRAPH_FILE
        _progress("tracing the step graph (torch.onnx, dynamo)")
        _export_graph(step, graph, names, opset)
        _progress("checking the graph (onnx.checker) and comparing onnxruntime with PyTorch")
        import onnx

        onnx.checker.check_model(str(graph), full_check=True)
        max_difference = compare_with_pytorch(step, graph, names, TOLERANCE[dtype])
        if tokenizer is not None:
            tokenizer.save(staging)
        cfg = model.config
        stop_ids = set(cfg.eos_token_id) | set(tokenizer.stop_token_ids if tokenizer else ())
        generation = {"eos_token_id": sorted(stop_ids),
                      "bos_token_id": tokenizer.bos_token_id if tokenizer else None,
                      "max_length": cfg.max_position_embeddings, **_source_sampling_defaults(checkpoint)}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        manifest = {
            "format": EXPORT_FORMAT, "format_version": 1,
            "source": source, "source_sha256": source_digest(checkpoint),
            "dtype": dtype, "quantization": scheme, "graph": GRAPH_FILE, "logits": "all" if all_logits else "last",
            **_describe_graph(graph),
            "model": {"model_type": cfg.model_type, "num_hidden_layers": cfg.num_hidden_layers,
                      "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
                      "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings},
            "validation": {"max_abs_difference_relative": max_difference, "tolerance": TOLERANCE[dtype]},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                      for p in sorted(staging.iterdir()) if p.is_file()},
        }
        (staging / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
        total = sum(f["bytes"] for f in manifest["files"].values())
        _progress(f"wrote {len(manifest['files']) + 1} files ({total / 1e6:.1f} MB); onnxruntime matches PyTorch "
                  f"within {max_difference:.2e} of the logits' scale")
    return destination


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    caches = [f"{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids", *(f"past_{c}" for c in caches)],
            ["logits", *(f"present_{c}" for c in caches)])


def sample_inputs(step: DecoderStep, batch: int, new: int, past: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random ids, a left-padded attention mask (row 0 padded by one token when there is room), positions
    that skip the padding, and random past keys/values."""
    cfg = step.config
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, new), generator=generator)
    mask = torch.ones(batch, past + new, dtype=torch.long)
    if batch > 1 and past + new > 2:
        mask[0, 0] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    dtype = next(step.model.model.norm.parameters()).dtype
    caches = [torch.randn(batch, cfg.num_key_value_heads, past, cfg.head_dim, generator=generator).to(dtype)
              for _ in range(2 * cfg.num_hidden_layers)]
    return ids, mask, positions, *caches


def _export_graph(step: DecoderStep, path: Path, names: tuple[list[str], list[str]], opset: int) -> None:
    from torch.export import Dim

    inputs, outputs = names
    batch, sequence, past = Dim("batch"), Dim("sequence"), Dim("past_sequence", min=0)
    total = Dim("total_sequence")
    cache = {0: batch, 2: past}
    dynamic = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: total},
               "position_ids": {0: batch, 1: sequence}, "past": tuple(cache for _ in inputs[3:])}
    # torch.onnx logs a warning per torchvision operator it cannot register when torchvision is absent: not ours
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        # torch.onnx reports that the cache axes share one name, which is what is meant
        warnings.filterwarnings("ignore", message=".*The axis name.*will not be used")
        program = torch.onnx.export(step, sample_inputs(step, batch=2, new=3, past=4), dynamo=True,
                                    input_names=inputs, output_names=outputs, dynamic_shapes=dynamic,
                                    opset_version=opset, verbose=False, optimize=False)
    program.save(str(path), external_data=True)


def compare_with_pytorch(step: DecoderStep, graph: Path, names: tuple[list[str], list[str]],
                         tolerance: float) -> float:
    """Run a prefill (empty past, padded batch) and a decode step through onnxruntime and PyTorch; raise
    if the logits differ by more than tolerance x their scale. Returns the worst relative difference."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch, new, past in ((2, 7, 0), (2, 1, 7)):
        inputs = sample_inputs(step, batch, new, past, seed=batch + new + past)
        with torch.no_grad():
            expected = step(*inputs)[0].numpy()
        got = session.run([names[1][0]], {n: t.numpy() for n, t in zip(names[0], inputs)})[0]
        if got.shape != expected.shape:
            raise RuntimeError(f"export check failed: onnxruntime's logits have shape {got.shape}, "
                               f"PyTorch's {expected.shape}")
        difference = float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max())))
        worst = max(worst, difference)
        if not difference <= tolerance:
            raise RuntimeError(f"export check failed: onnxruntime's logits differ from PyTorch's by {difference:.3g} "
                               f"of their scale at batch {batch}, {new} new and {past} past tokens "
                               f"(tolerance {tolerance})")
    return worst


def _describe_graph(graph: Path) -> dict:
    """The graph's opset and its inputs and outputs: name, element type, shape (names for dynamic axes)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)

    def values(items) -> list[dict]:
        return [{"name": v.name, "type": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in items]

    opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    return {"opset": opset, "inputs": values(model.graph.input), "outputs": values(model.graph.output)}


def _source_sampling_defaults(checkpoint) -> dict:
    """temperature / top_p / top_k from the source's generation_config.json, when it has one."""
    path = getattr(checkpoint, "path", None)
    file = Path(path) / "generation_config.json" if path is not None and Path(path).is_dir() else None
    if file is None or not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: config[k] for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty") if k in config}


def source_digest(checkpoint) -> str | None:
    """sha256 over the source's weight and config files (a file source: the file itself)."""
    path = getattr(checkpoint, "path", None)
    if path is None:
        return None
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf", ".bin", ".json") and p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(bytes.fromhex(file_sha256(file)))
    return digest.hexdigest()


def _progress(message: str) -> None:
    print(f"llminfer: {message}", file=sys.stderr, flush=True)
