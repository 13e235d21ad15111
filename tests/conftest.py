"""Shared fixtures: tiny random Hugging Face models saved to disk, and the real SmolLM2 GGUF."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

def prefill_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """Last-position logits [len(prompts), V] of each prompt, prefilled together in a fresh engine."""
    from llminfer import EngineConfig, SamplingParams
    from llminfer.engine.llm_engine import LLMEngine

    engine = LLMEngine(model, None, EngineConfig())
    for ids in prompts:
        engine.add_request(ids, SamplingParams(max_tokens=1))
    return engine.runner.compute_logits(engine.scheduler.schedule())


@pytest.fixture(autouse=True)
def check_kv_pool_after_every_step(monkeypatch):
    """In every test, the KV block pool's invariants are verified after each engine step."""
    from llminfer.engine.llm_engine import LLMEngine

    original_step = LLMEngine.step

    def checked_step(self):
        outputs = original_step(self)
        self.kv.check_invariants()
        return outputs

    monkeypatch.setattr(LLMEngine, "step", checked_step)


TINY_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)

# name -> (transformers config class, extra fields)
TINY_VARIANTS = {
    "llama": ("LlamaConfig", dict(rope_theta=10000.0, tie_word_embeddings=False)),
    "llama3-rope-scaling": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(rope_theta=1000000.0, sliding_window=12, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(rope_theta=1000000.0, head_dim=24, tie_word_embeddings=True)),
    "phi3": ("Phi3Config", dict(rope_theta=10000.0, sliding_window=12, tie_word_embeddings=False,
                                pad_token_id=0, eos_token_id=1, bos_token_id=2)),
    "gemma3": ("Gemma3TextConfig", dict(
        head_dim=24, query_pre_attn_scalar=20, sliding_window=12, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention"], hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})),
}


def make_hf_model(variant: str, seed: int = 0):
    import transformers

    class_name, extra = TINY_VARIANTS[variant]
    config = getattr(transformers, class_name)(**TINY_COMMON, **extra)
    config._attn_implementation = "eager"  # the reference path: explicit masks, sliding window included
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # default init leaves biases at zero; randomize so Qwen2's q/k/v biases are tested
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
            elif variant in ("qwen3", "gemma3") and "norm" in name:  # not the identity: the norms are tested
                param.normal_(0.0 if variant == "gemma3" else 1.0, 0.3)
    return model


@pytest.fixture(scope="session", params=list(TINY_VARIANTS))
def tiny_hf(request, tmp_path_factory) -> tuple[str, object, Path]:
    """(variant name, transformers model, folder it was saved to as safetensors)."""
    model = make_hf_model(request.param)
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.save_pretrained(folder, safe_serialization=True)
    return request.param, model, folder


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory) -> Path:
    model = make_hf_model("llama")
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from llminfer.loading.default_models import fetch_alias

    return fetch_alias("smollm2-135m")


def transformers_from_gguf(path: Path):
    """(tokenizer, model): transformers' own load of a GGUF file, in float32 — the real-weights oracle."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs).eval()
    return tokenizer, model


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    return transformers_from_gguf(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_llm():
    from llminfer import LLM

    return LLM("smollm2-135m", dtype="float32")


TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_folder(tmp_path_factory) -> Path:
    """The tiny random Llama with a real byte-level BPE tokenizer of its vocabulary size (trained here on the
    pydoc text) and a chat template: text in, text out, in milliseconds."""
    import json
    import pydoc_data.topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_COMMON["vocab_size"], special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(list(pydoc_data.topics.topics.values()), trainer)
    model = make_hf_model("llama")
    model.config.bos_token_id, model.config.eos_token_id = None, 1  # <|im_end|>
    folder = tmp_path_factory.mktemp("tiny-chat")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "chat_template": TINY_CHAT_TEMPLATE}))
    return folder


def int8_activation_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64: x [M, K] quantized per block of 32 as our kernels do (|max| / 127, round half to even) ->
    (levels [M, K/32, 32], scales [M, K/32])."""
    m, k = x.shape
    blocks = x.double().reshape(m, k // 32, 32)
    block_scale = blocks.abs().amax(dim=-1, keepdim=True) / 127
    xq = torch.where(block_scale > 0, torch.round(blocks / block_scale), torch.zeros_like(blocks))
    return xq, block_scale.squeeze(-1)


def emulated_int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float64: int8 activation blocks times int8 weights [N, K], exact integer dot per block, then both scales
    (a last block that K does not fill zero padded)."""
    padding = -x.shape[1] % 32
    x, qweight = torch.nn.functional.pad(x, (0, padding)), torch.nn.functional.pad(qweight, (0, padding))
    xq, block_scale = int8_activation_blocks(x)
    w = qweight.double().reshape(qweight.shape[0], x.shape[1] // 32, 32)
    per_block = torch.einsum("mbi,nbi->mnb", xq, w)  # exact in float64 (|sum| < 2**20)
    return (per_block * block_scale[:, None, :]).sum(-1) * scales.double()


def emulated_int4_linear(x: torch.Tensor, levels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """float64: int8 activation blocks times int4 levels [N, K] with the blocks32 table's (scale, min) per block:
    sum_b dx_b (s_b dot(q, xq) + m_b sum(xq))."""
    xq, dx = int8_activation_blocks(x)
    q = levels.double().reshape(levels.shape[0], x.shape[1] // 32, 32)
    t = table.double()[:, : x.shape[1] // 32]
    dot = torch.einsum("mbi,nbi->mnb", xq, q)
    sums = xq.sum(-1)  # [M, K/32]
    return (dx[:, None] * (dot * t[None, :, :, 0] + sums[:, None] * t[None, :, :, 1])).sum(-1)
