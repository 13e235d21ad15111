"""GGUF files written here (llama.cpp layout: permuted Q/K rows, quantized blocks) load like the original.

Oracles: the Hugging Face model the file was made from (exact for F32, through the dequantized
weights otherwise) and transformers' own GGUF loader on the same file.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import make_hf_model, prefill_logits
from gguf import GGMLQuantizationType as Q

from llminfer import AutoModel
from llminfer.layers.rotary import rope_inverse_frequencies
from llminfer.loading import open_checkpoint
from llminfer.loading.gguf_file import hf_name, llama3_scaling_matching, unpermute_rope_rows

_BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    if hf in globals_:
        return globals_[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_BLOCK_NAMES[module]}.{kind}"


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Q/K permutation (HF rotate-half -> interleaved pairs)."""
    pairs = weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def byte_level_vocab(size: int) -> tuple[list[str], list[int]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    tokens = ["<|endoftext|>"] + alphabet + [f"<|extra_{i}|>" for i in range(size - 1 - len(alphabet))]
    return tokens, [3] + [1] * len(alphabet) + [3] * (size - 1 - len(alphabet))


def write_gguf(hf_model, path: Path, tensor_type: dict[str, Q] | Q,
               metadata: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Write hf_model as a llama GGUF; returns the float weights each tensor decodes to (HF layout).
    metadata: keys whose (unsigned integer) values replace what the model's config says."""
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    tokens, types = byte_level_vocab(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    decoded = {}
    for name, tensor in hf_model.state_dict().items():
        array = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, cfg.num_key_value_heads)
        qtype = tensor_type if isinstance(tensor_type, Q) else tensor_type.get(name.rsplit(".", 2)[-2], Q.F32)
        if array.ndim == 1 or qtype == Q.F32:
            stored, qtype = array.astype(np.float32), Q.F32
        elif qtype == Q.F16:
            stored = array.astype(np.float16)
        else:
            stored = gguf.quants.quantize(array, qtype)
        writer.add_tensor(gguf_name(name), stored, raw_dtype=qtype)
        back = gguf.quants.dequantize(stored, qtype).reshape(array.shape)
        if name.endswith("q_proj.weight"):
            back = unpermute_rope_rows(back, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            back = unpermute_rope_rows(back, cfg.num_key_value_heads)
        decoded[name] = back
    scaling = getattr(cfg, "rope_parameters", {}) or {}
    if scaling.get("rope_type") == "llama3":  # llama.cpp stores Llama 3 rope scaling as per-frequency divisors
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        divisors = (rope_inverse_frequencies(head_dim, scaling["rope_theta"], None)
                    / rope_inverse_frequencies(head_dim, scaling["rope_theta"], scaling))
        writer.add_tensor("rope_freqs.weight", divisors.numpy().astype(np.float32), raw_dtype=Q.F32)
    for key, value in (metadata or {}).items():
        kind = gguf.GGUFValueType.UINT64 if value >= 2**32 else gguf.GGUFValueType.UINT32
        writer.kv_data[0][key] = gguf.GGUFValue(value, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return decoded


def last_logits(model, ids: list[int]) -> torch.Tensor:
    return prefill_logits(model, [ids])[0]


PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 1, 2]


@pytest.mark.parametrize("variant", ["llama", "llama3-rope-scaling"])
def test_f32_gguf_reproduces_the_original_model_exactly(tmp_path, variant):
    hf_model = make_hf_model(variant)
    write_gguf(hf_model, tmp_path / "tiny.gguf", Q.F32)
    ours = AutoModel.from_pretrained(tmp_path / "tiny.gguf")
    if variant == "llama3-rope-scaling":  # tiny, non-standard parameters: kept as raw frequency factors
        assert ours.config.rope_type == "freq_factors"
    with torch.no_grad():
        expected = hf_model(torch.tensor([PROMPT])).logits[0, -1]
    torch.testing.assert_close(last_logits(ours, PROMPT), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_quantized_gguf_dequantizes_to_the_written_blocks(tmp_path, qtype):
    hf_model = make_hf_model("llama")
    decoded = write_gguf(hf_model, tmp_path / f"tiny-{qtype.name}.gguf", qtype)
    checkpoint = open_checkpoint(str(tmp_path / f"tiny-{qtype.name}.gguf"))
    loaded = dict(checkpoint.named_tensors())
    assert set(loaded) == set(decoded)
    for name, tensor in loaded.items():
        np.testing.assert_array_equal(tensor.numpy(), decoded[name].astype(np.float32), err_msg=name)
    # and the whole model agrees with transformers reading the same file
    from transformers import AutoModelForCausalLM

    hf_from_gguf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f"tiny-{qtype.name}.gguf",
                                                        dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf_from_gguf(torch.tensor([PROMPT])).logits[0, -1]
    ours = AutoModel.from_pretrained(tmp_path / f"tiny-{qtype.name}.gguf")
    torch.testing.assert_close(last_logits(ours, PROMPT), expected, atol=1e-4, rtol=0)


def _random_k_quant_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    if qtype == Q.Q6_K:  # ... ql, qh, int8 scales, then d (f16) last
        blocks[..., -2:] = scale
    else:  # d and dmin (f16) first
        blocks[..., 0:2] = scale
        blocks[..., 2:4] = scale
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quant_tensors_load_like_transformers(tmp_path, qtype):
    """K-quant blocks (256 values each) have no Python quantizer, so the file is written from random blocks."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf_model = AutoModelForCausalLM.from_config(config)
    path = tmp_path / "k.gguf"
    write_gguf(hf_model, path, Q.F32)
    rng = np.random.default_rng(0)
    # rewrite the file with the two projections whose rows are 256 wide as K-quant blocks
    reader = gguf.GGUFReader(str(path))
    writer = gguf.GGUFWriter(str(tmp_path / "kq.gguf"), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
    for tensor in reader.tensors:
        data = np.array(tensor.data)
        if tensor.name.endswith(("attn_q.weight", "ffn_up.weight")):
            rows, cols = data.shape
            writer.add_tensor(tensor.name, _random_k_quant_blocks(qtype, rows, cols, rng), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    hf_from_gguf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="kq.gguf", dtype=torch.float32).eval()
    ours = AutoModel.from_pretrained(tmp_path / "kq.gguf")
    with torch.no_grad():
        expected = hf_from_gguf(torch.tensor([PROMPT])).logits[0, -1]
    torch.testing.assert_close(last_logits(ours, PROMPT), expected, atol=1e-4, rtol=1e-5)


def test_llama_3_1_rope_factors_are_recognised_as_hf_llama3_scaling():
    llama31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    factors = rope_inverse_frequencies(128, 500000.0, None) / rope_inverse_frequencies(128, 500000.0, llama31)
    assert llama3_scaling_matching(factors.tolist(), 128, 500000.0) == llama31
    assert llama3_scaling_matching([1.0] * 64, 128, 500000.0) is None


def test_gguf_tensor_names_map_to_hf():
    from llminfer.architectures import ARCHITECTURES

    LLAMA = ARCHITECTURES["llama"]  # noqa: N806
    assert hf_name("blk.2.attn_q_norm.weight", ARCHITECTURES["qwen3"]) == "model.layers.2.self_attn.q_norm.weight"
    assert hf_name("blk.2.attn_q_norm.weight", LLAMA) is None
    assert hf_name("blk.3.attn_q.weight", LLAMA) == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_down.weight", LLAMA) == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("output_norm.weight", LLAMA) == "model.norm.weight"
    assert hf_name("rope_freqs.weight", LLAMA) is None


@pytest.mark.slow
def test_a_requantized_gguf_has_the_same_metadata_and_the_same_weights_in_q8_0(smollm2_gguf, tmp_path):
    """What `bench latency --compare llama.cpp --quantization a16w8` runs llama.cpp on."""
    import gguf
    import numpy as np

    from llminfer.cli.llama_cpp_peer import requantized_gguf

    source = tmp_path / smollm2_gguf.name
    source.symlink_to(smollm2_gguf)
    written = requantized_gguf(str(source), "Q8_0", lambda message: None)
    assert written == str(tmp_path / f"{source.stem}.as-Q8_0.gguf") and not list(tmp_path.glob("*.partial"))
    assert requantized_gguf(str(source), "Q8_0", pytest.fail) == written  # written once
    old, new = gguf.GGUFReader(source), gguf.GGUFReader(written)
    assert {k: f.contents() for k, f in old.fields.items() if not k.startswith("GGUF.")} == \
           {k: f.contents() for k, f in new.fields.items() if not k.startswith("GGUF.")}
    new_tensors = {t.name: t for t in new.tensors}
    assert [t.name for t in old.tensors] == list(new_tensors)
    for tensor in old.tensors:
        again = new_tensors[tensor.name]
        assert list(again.shape) == list(tensor.shape)
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
            assert again.tensor_type == tensor.tensor_type and np.array_equal(again.data, tensor.data)
            continue
        assert again.tensor_type == gguf.GGMLQuantizationType.Q8_0
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        blocks = values.reshape(-1, 32)
        error = np.abs(gguf.quants.dequantize(again.data, again.tensor_type).reshape(-1, 32) - blocks)
        # Q8_0: 34 bytes a block, its float16 scale d (|max| / 127) then 32 int8 values; they are rounded with d
        # before d is rounded to float16 (as llama.cpp does): half a step, plus up to 127 x d's rounding (2^-11 d)
        scales = np.asarray(again.data).reshape(-1, 34)[:, :2].copy().view(np.float16).astype(np.float32)
        assert (error <= np.abs(scales) * (0.5 + 127 * 2.0 ** -11) * 1.001 + 1e-7).all(), tensor.name
