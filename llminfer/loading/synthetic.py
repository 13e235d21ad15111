"""Models with random weights in a real architecture's shapes, for benchmarks where the shapes and the bytes matter,
not the text: `random-llama-1b` is Llama 3.2 1B's decoder (hidden 2048, 16 layers, 32 query / 8 key-value heads,
MLP 8192) with SmolLM2's tokenizer (vocabulary 49152, so ~1.07 B parameters), written once as a float16 GGUF that
both llminfer and llama.cpp read (llama.cpp through copies requantized by cli/llama_cpp_peer.py).
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llminfer.loading.default_models import cache_dir, fetch_alias

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class SyntheticModel:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tokenizer_from: str  # the alias whose GGUF lends its tokenizer (and vocabulary size)
    rope_theta: float = 500000.0
    context: int = 8192
    seed: int = 0
    init_std: float = 0.02


SYNTHETIC: dict[str, SyntheticModel] = {
    "random-llama-1b": SyntheticModel(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192,
                                      tokenizer_from="smollm2-135m"),
}


def synthetic_gguf(alias: str) -> Path:
    """The float16 GGUF of `alias`, written on first use (through a temporary file: a stopped run leaves nothing
    half-written)."""
    import gguf

    spec = SYNTHETIC[alias]
    target = cache_dir() / "models" / f"{alias}.F16.gguf"
    if target.is_file():
        return target
    source = gguf.GGUFReader(fetch_alias(spec.tokenizer_from))
    vocab = len(source.fields["tokenizer.ggml.tokens"].contents())
    print(f"llminfer: writing {target} (random weights in Llama shapes, {alias}, once) ...", file=sys.stderr,
          flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".{os.getpid()}.partial")
    writer = gguf.GGUFWriter(partial, "llama")
    try:
        for field in source.fields.values():
            if field.name.startswith("tokenizer."):
                array = field.types[0] == gguf.GGUFValueType.ARRAY
                writer.add_key_value(field.name, field.contents(), field.types[0],
                                     sub_type=field.types[-1] if array else None)
        writer.add_name(alias)
        writer.add_block_count(spec.layers)
        writer.add_context_length(spec.context)
        writer.add_embedding_length(spec.hidden)
        writer.add_feed_forward_length(spec.intermediate)
        writer.add_head_count(spec.heads)
        writer.add_head_count_kv(spec.kv_heads)
        writer.add_rope_freq_base(spec.rope_theta)
        writer.add_rope_dimension_count(spec.hidden // spec.heads)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(vocab)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        for name, shape in _tensor_shapes(spec, vocab):
            writer.add_tensor(name, _values(spec, name, shape))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _tensor_shapes(spec: SyntheticModel, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """GGUF tensor names with numpy shapes [rows, columns] (= [out, in]); the LM head is tied to the embedding."""
    head_dim = spec.hidden // spec.heads
    shapes = [("token_embd.weight", (vocab, spec.hidden))]
    for i in range(spec.layers):
        shapes += [(f"blk.{i}.attn_norm.weight", (spec.hidden,)),
                   (f"blk.{i}.attn_q.weight", (spec.hidden, spec.hidden)),
                   (f"blk.{i}.attn_k.weight", (spec.kv_heads * head_dim, spec.hidden)),
                   (f"blk.{i}.attn_v.weight", (spec.kv_heads * head_dim, spec.hidden)),
                   (f"blk.{i}.attn_output.weight", (spec.hidden, spec.hidden)),
                   (f"blk.{i}.ffn_norm.weight", (spec.hidden,)),
                   (f"blk.{i}.ffn_gate.weight", (spec.intermediate, spec.hidden)),
                   (f"blk.{i}.ffn_up.weight", (spec.intermediate, spec.hidden)),
                   (f"blk.{i}.ffn_down.weight", (spec.hidden, spec.intermediate))]
    return shapes + [("output_norm.weight", (spec.hidden,))]


def _values(spec: SyntheticModel, name: str, shape: tuple[int, ...]) -> "np.ndarray":
    """Norm weights 1 (float32, as llama.cpp's converter stores them), matrices N(0, std^2) in float16, seeded
    per tensor so that the file does not depend on the order it is written in."""
    import numpy as np

    if len(shape) == 1:
        return np.ones(shape, dtype=np.float32)
    rng = np.random.default_rng([spec.seed, int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)])
    return (rng.standard_normal(shape, dtype=np.float32) * spec.init_std).astype(np.float16)
