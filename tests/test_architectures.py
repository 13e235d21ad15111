"""The architecture registry and the architectures added through it (Qwen3, Gemma 3, Phi-3): the same engine paths
as Llama (batching, prefix caching, A16W8, tensor parallelism), against transformers on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_hf_model, prefill_logits
from test_parallel import torchrun

from llminfer import LLM, AutoModel, SamplingParams
from llminfer.architectures import ARCHITECTURES
from llminfer.config import ModelConfig
from llminfer.errors import UnsupportedModelError

NEW = ["qwen3", "gemma3", "phi3"]
SHARED = list(range(30, 62))  # two full blocks of 16: prompts that start alike share them
PROMPTS = [SHARED + [5, 6, 7], SHARED + [9, 10], [1, 2, 3, 4]]


@pytest.fixture(scope="module", params=NEW)
def new_arch(request, tmp_path_factory):
    model = make_hf_model(request.param)
    folder = tmp_path_factory.mktemp(f"arch-{request.param}")
    model.save_pretrained(folder, safe_serialization=True)
    return request.param, model, folder


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_every_entry_names_an_importable_network():
    for entry in ARCHITECTURES.values():
        assert entry.network_class().__name__.endswith("ForCausalLM"), entry.model_type


def test_unknown_architecture_names_the_supported_ones_from_the_registry():
    with pytest.raises(UnsupportedModelError) as caught:
        ModelConfig.from_hf_dict({"architectures": ["FalconForCausalLM"], "vocab_size": 8, "hidden_size": 8,
                                  "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1},
                                 "config.json")
    message = str(caught.value)
    assert message.startswith("config.json: architecture 'FalconForCausalLM' is not supported (supported: ")
    for entry in ARCHITECTURES.values():
        assert entry.hf_architectures[0] in message


def test_each_config_reads_what_its_architecture_adds(new_arch):
    variant, _, folder = new_arch
    config = AutoModel.from_pretrained(folder).config
    if variant == "gemma3":
        assert config.layer_types == ("sliding_attention", "full_attention")
        assert (config.rope_local_base_freq, config.rope_theta) == (10000.0, 1000000.0)
        assert config.query_pre_attn_scalar == 20 and config.hidden_act == "gelu_pytorch_tanh" and config.qk_norm
        assert [config.layer_sliding_window(i) for i in range(2)] == [12, None]
    elif variant == "qwen3":
        assert config.qk_norm and config.layer_types is None and config.head_dim == 24
    else:  # phi3: the checkpoint's fused projections loaded whole
        assert config.sliding_window == 12 and not config.qk_norm
        from safetensors import safe_open

        with safe_open(folder / "model.safetensors", "pt") as f:
            assert "model.layers.0.self_attn.qkv_proj.weight" in f.keys()
            assert "model.layers.0.mlp.gate_up_proj.weight" in f.keys()


def test_batched_prefix_cached_greedy_equals_transformers(new_arch):
    variant, hf_model, folder = new_arch
    llm = LLM(str(folder), enable_prefix_caching=True, max_num_seqs=4)
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert llm.kv_cache_stats().prefix_cache_hit_tokens >= 32  # the second prompt reused the shared blocks
    for ids, output in zip(PROMPTS, outputs):
        assert output.token_ids == hf_greedy(hf_model, ids, 32), variant


def test_a16w8_loads_and_follows_the_float_model(new_arch):
    variant, _, folder = new_arch
    exact = AutoModel.from_pretrained(folder)
    quantized = LLM(str(folder), quantization="a16w8", dtype="float32")
    assert quantized.model.quantization.scheme == "a16w8"
    got = quantized.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert all(o.finish_reason == "length" and len(o.token_ids) == 8 for o in got)
    reference = prefill_logits(exact, PROMPTS)
    approx = prefill_logits(quantized.model, PROMPTS)
    assert (approx - reference).abs().max() < 0.05 * reference.abs().max(), variant


def test_two_ranks_equal_one_process(new_arch):
    variant, _, folder = new_arch
    prompts = [PROMPTS[0][:20], PROMPTS[2]]
    llm = LLM(str(folder), kv_cache_memory="8MiB")
    expected = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0,
                                                                          ignore_eos=True))]
    assert torchrun(folder, 2, prompts) == expected, variant


def test_converted_folder_round_trips_the_new_config_fields(new_arch, tmp_path):
    from llminfer.loading.convert import convert_checkpoint

    variant, _, folder = new_arch
    out = convert_checkpoint(str(folder), tmp_path / "out", dtype="float32")
    original, converted = AutoModel.from_pretrained(folder), AutoModel.from_pretrained(out)
    assert converted.config == original.config
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == [ARCHITECTURES[variant].hf_architectures[0]]
    torch.testing.assert_close(prefill_logits(converted, PROMPTS), prefill_logits(original, PROMPTS))


@pytest.mark.parametrize("extra,message", [
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
     "rope_scaling type 'longrope' is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75}},
     "partial_rotary_factor=0.75 is not supported"),
])
def test_phi3_features_we_do_not_implement_are_refused_in_one_line(extra, message):
    hf = {"architectures": ["Phi3ForCausalLM"], "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
          "num_hidden_layers": 1, "num_attention_heads": 2, **extra}
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_hf_dict(hf, "config.json")
