"""bench's random-weight models (llminfer/loading/synthetic.py): a GGUF that transformers reads to the same logits
as we do, written once and reproducibly; the copies llama.cpp runs beside our int4 / int8 weights; and the weight
bytes a decode step reads, which bench reports against the memory's bandwidth."""

import gguf
import numpy as np
import pytest
import torch

from llminfer.cli.bench import gguf_weight_bytes_per_step, weight_bytes_per_step
from llminfer.cli.llama_cpp_peer import requantized_gguf
from llminfer.loading import synthetic
from llminfer.loading.synthetic import SyntheticModel

TINY = SyntheticModel(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, tokenizer_from="smollm2-135m")


@pytest.fixture
def tiny_synthetic(monkeypatch, tmp_path):
    monkeypatch.setitem(synthetic.SYNTHETIC, "random-tiny", TINY)
    monkeypatch.setattr(synthetic, "cache_dir", lambda: tmp_path)
    return synthetic.synthetic_gguf("random-tiny")


def test_the_random_model_is_written_once_and_transformers_reads_it_to_our_logits(tiny_synthetic, tmp_path):
    from transformers import AutoModelForCausalLM

    from llminfer.model import AutoModel

    assert tiny_synthetic == tmp_path / "models" / "random-tiny.F16.gguf"
    assert not list(tiny_synthetic.parent.glob("*.partial"))
    reader = gguf.GGUFReader(tiny_synthetic)
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # the head is tied to the embedding
    assert tensors["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert list(tensors["blk.0.attn_k.weight"].shape) == [64, 32]  # ne order: [in, out]; 2 kv heads of 16
    first = np.array(tensors["blk.0.attn_q.weight"].data)
    assert 0.015 < first.astype(np.float32).std() < 0.025  # init_std 0.02
    assert synthetic.synthetic_gguf("random-tiny") == tiny_synthetic  # written once: the same file again

    ours = AutoModel.from_pretrained("random-tiny", dtype="float32")  # the alias resolves to the file
    assert (ours.config.hidden_size, ours.config.num_hidden_layers, ours.config.num_key_value_heads,
            ours.config.intermediate_size, ours.config.vocab_size) == (64, 2, 2, 128, 49152)
    theirs = AutoModelForCausalLM.from_pretrained(str(tiny_synthetic.parent), gguf_file=tiny_synthetic.name,
                                                  dtype=torch.float32).eval()
    ids = [1, 500, 7000, 42, 3]
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours.sequence_logits(ids), expected, atol=2e-4, rtol=1e-4)


def test_the_same_seed_writes_the_same_weights(tiny_synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "cache_dir", lambda: tmp_path / "again")
    again = synthetic.synthetic_gguf("random-tiny")
    old, new = gguf.GGUFReader(tiny_synthetic), gguf.GGUFReader(again)
    for a, b in zip(old.tensors, new.tensors):
        assert a.name == b.name and np.array_equal(np.array(a.data), np.array(b.data))


def test_llama_cpp_runs_q4_1_and_q8_0_copies_of_the_same_weights(tiny_synthetic):
    q4 = requantized_gguf(str(tiny_synthetic), "Q4_1", lambda message: None, embedding_type="Q8_0")
    assert q4.endswith("random-tiny.F16.as-Q4_1.gguf")
    source = {t.name: t for t in gguf.GGUFReader(tiny_synthetic).tensors}
    for tensor in gguf.GGUFReader(q4).tensors:
        expected_type = ("F32" if len(tensor.shape) == 1 else "Q8_0" if tensor.name == "token_embd.weight"
                         else "Q4_1")
        assert tensor.tensor_type.name == expected_type, tensor.name
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        original = gguf.quants.dequantize(source[tensor.name].data, source[tensor.name].tensor_type)
        step = {"F32": 0, "Q8_0": 2 / 127, "Q4_1": 1 / 15}[expected_type]  # of each block's range, at most
        blocks, got = original.reshape(-1, 32) if original.ndim > 1 else original[None], values.reshape(-1, 32) \
            if values.ndim > 1 else values[None]
        spread = blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)
        assert (np.abs(got - blocks) <= step * spread + 1e-3 * np.abs(blocks).max()).all(), tensor.name
    # a file already holding those types is run as it is
    assert requantized_gguf(q4, "Q4_1", pytest.fail, embedding_type="Q8_0") == q4


def test_the_weight_bytes_a_decode_step_reads(tiny_synthetic):
    from llminfer.model import AutoModel

    params_per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 128 * 64 * 3  # q, o; k, v; gate, up, down
    embedding = 49152 * 64
    float32 = AutoModel.from_pretrained("random-tiny", dtype="float32")
    norms = (2 * 2 + 1) * 64
    assert weight_bytes_per_step(float32) == 4 * (2 * params_per_layer + embedding + norms)  # the tied head once
    a16w8 = AutoModel.from_pretrained("random-tiny", quantization="a16w8")  # bfloat16 compute, int8 head
    int8_bytes = weight_bytes_per_step(a16w8)
    # int8 matrices (tiles padded to 64 columns: already whole here) and their bfloat16 row scales, the int8 head;
    # not the bfloat16 embedding table, of which a step reads one row
    rows = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64) + 49152
    assert int8_bytes == 2 * params_per_layer + embedding + 2 * rows + 2 * norms
    assert gguf_weight_bytes_per_step(str(tiny_synthetic)) == 2 * (2 * params_per_layer + embedding) + 4 * norms


def test_bench_runs_llama_cpp_on_the_file_of_each_scheme(tiny_synthetic, smollm2_gguf, monkeypatch):
    from llminfer.cli import bench, llama_cpp_peer

    ran = []
    monkeypatch.setattr(llama_cpp_peer, "measure", lambda gguf, prompts, output_len, iters, threads, log: (
        ran.append(gguf) or ([(0.1, 1.0)] * iters, [])))
    for model, scheme, label, file in [("random-tiny", "a16w4", "llama.cpp Q4_1", "random-tiny.F16.as-Q4_1.gguf"),
                                       ("random-tiny", "a16w8", "llama.cpp Q8_0", "random-tiny.F16.as-Q8_0.gguf"),
                                       ("random-tiny", None, "llama.cpp", "random-tiny.F16.gguf"),
                                       ("smollm2-135m", "a16w4", "llama.cpp", smollm2_gguf.name)]:
        monkeypatch.setattr(llama_cpp_peer, "check_available", lambda: None)
        result, gguf_path = bench.measure_llama_cpp(model, [[1, 2, 3]], 4, 1, lambda message: None,
                                                    bench.LLAMA_CPP_WEIGHTS.get(scheme))
        assert result.engine == label and gguf_path.endswith(file) and ran[-1] == gguf_path
