"""Hostile or broken model files: each is a one-line error (exit 2 from the CLI) before any large allocation,
never a traceback, an allocator failure or a process killed for memory. (Randomized: tests/fuzz/.)"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file, save_file
from test_gguf import write_gguf

# The CLI in a process whose address space is capped: an allocation the checks missed fails the test.
MEMORY_CAP_KB = 4 * 2**20


def generate(model: Path) -> subprocess.CompletedProcess:
    command = f"ulimit -v {MEMORY_CAP_KB}; exec {sys.executable} -m llminfer generate -m {model} -n 2 hi"
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=180)


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("llminfer: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def edited_folder(tiny_chat_folder: Path, tmp_path: Path, **fields) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_chat_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))
    return folder


@pytest.mark.parametrize("field,value,fragments", [
    ("hidden_size", 10**9, ["embed_tokens", "[320, 64]"]),
    ("hidden_size", 1e9, ["hidden_size", "positive integer"]),
    ("vocab_size", 10**12, ["embed_tokens", "vocab_size=1000000000000"]),
    ("intermediate_size", 10**9, ["gate_proj", "[1000000000, 64]"]),
    ("num_hidden_layers", 10**6, ["num_hidden_layers=1000000", "2 layers"]),
    ("num_attention_heads", 0, ["num_attention_heads", "positive integer"]),
    ("max_position_embeddings", 10**12, ["position tables", "GiB is available", "--max-model-len"]),
    ("rope_theta", math.nan, ["rope_theta", "finite positive"]),
    ("rms_norm_eps", -1.0, ["rms_norm_eps", "finite positive"]),
])
def test_config_values_that_disagree_with_the_tensors_are_refused_first(tiny_chat_folder, tmp_path, field, value,
                                                                        fragments):
    assert_refused(generate(edited_folder(tiny_chat_folder, tmp_path, **{field: value})), *fragments)


def test_max_model_len_sizes_the_position_tables(tiny_chat_folder, tmp_path):
    from llminfer import LLM

    folder = edited_folder(tiny_chat_folder, tmp_path, max_position_embeddings=10**12)
    llm = LLM(str(folder), max_model_len=256)  # the context used, not the config's maximum
    assert llm.engine.max_model_len == 256
    assert llm.model.model.rotary_emb.cos.shape[0] == 256


def test_a_deeply_nested_config_is_one_line(tiny_chat_folder, tmp_path):
    folder = edited_folder(tiny_chat_folder, tmp_path)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_refused(generate(folder), "config.json", "nested too deeply")


def test_integer_tensors_are_refused_where_float_weights_belong(tiny_chat_folder, tmp_path):
    folder = edited_folder(tiny_chat_folder, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    embedding = tensors["model.embed_tokens.weight"]
    tensors["model.embed_tokens.weight"] = embedding.view(torch.int32)  # the same bytes, an integer dtype
    save_file(tensors, folder / "model.safetensors")
    assert_refused(generate(folder), "model.embed_tokens.weight", "int32", "float weight")


@pytest.mark.parametrize("key,value,fragments", [
    ("llama.attention.head_count", 0, ["head_count", "positive integer"]),
    ("llama.block_count", 1_000_000, ["num_hidden_layers=1000000"]),
    ("llama.context_length", 2**31, ["position tables"]),
    ("llama.embedding_length", 2**31, ["embed_tokens"]),
])
def test_gguf_metadata_that_disagrees_with_the_tensors_is_refused_first(tmp_path, key, value, fragments):
    path = tmp_path / "tiny.gguf"
    write_gguf(make_hf_model("llama"), path, Q.F32, metadata={key: value})
    assert_refused(generate(path), *fragments)


def gguf_bytes(entries: bytes, n_kv: int = 1, n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + entries + b"\0" * 64


def key(name: bytes) -> bytes:
    return struct.pack("<Q", len(name)) + name


@pytest.mark.parametrize("content,fragments", [
    (gguf_bytes(key(b"general.architecture") + struct.pack("<IIQ", 9, 4, 2**40)), [f"declares {2**40} elements"]),
    (gguf_bytes(key(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**40)), [f"declares {2**40} elements"]),
    (gguf_bytes(struct.pack("<Q", 2**62)), ["metadata key 0", "runs past the end"]),
    (gguf_bytes(b"", n_kv=2**40), ["metadata entries"]),
    (gguf_bytes(key(b"t") + struct.pack("<IQ", 2, 0), n_kv=0, n_tensors=1), ["dimension of 0"]),
    (b"GGUF" + struct.pack("<I", 99) + b"\0" * 32, ["version 99"]),
    (b"PK\3\4" + b"\0" * 64, ["not a GGUF file"]),
])
def test_gguf_headers_with_impossible_counts_are_refused_without_reading_them(tmp_path, content, fragments):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(content)
    for command in (["info", str(path)], ["generate", "-m", str(path), "hi"]):
        shell = f"ulimit -v {MEMORY_CAP_KB}; exec timeout 60 {sys.executable} -m llminfer {' '.join(command)}"
        assert_refused(subprocess.run(["bash", "-c", shell], capture_output=True, text=True), str(path), *fragments)
