"""Post-training quantization: round trips within each scheme's error bound, every quantized layer equal to its
float64 reference, checkpoints that save/reload bit for bit and load without float weights, the int8 KV cache
against float attention, GPTQ and SmoothQuant against round-to-nearest, the CLI and its bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import prefill_logits

from llminfer import LLM, SamplingParams, generate
from llminfer.errors import ConfigError, ModelFormatError
from llminfer.layers.linear import Linear
from llminfer.model import AutoModel
from llminfer.ops import reference_ops, resolve_ops
from llminfer.quantization import GPTQ, RTN, PTQConfig, QuantizationConfig, save_quantized
from llminfer.quantization import functional as Q
from llminfer.quantization.layers import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear, QuantizedLinear
from llminfer.quantization.ptq import gptq_int4
from llminfer.quantization.save import weight_memory

SCHEMES = [("a16w8", None), ("a16w4", 32), ("a16w4", 64), ("a16w4", 128), ("a8w8", None)]


@pytest.fixture(scope="module")
def quant_folder(tmp_path_factory):
    """A tiny random Llama whose widths (128 hidden, 256 intermediate) every group size divides."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp("quant-llama")
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def ptq(scheme: str, group_size: int | None, **kwargs) -> PTQConfig:
    return PTQConfig.for_scheme(scheme, group_size=group_size, **kwargs)


LAYER_OP = {"a16w8": "int8_weight_linear", "a16w4": "int4_weight_linear", "a8w8": "int8_int8_linear"}


def random_linear(in_features=256, out_features=96, bias=True, seed=0, ops=None) -> Linear:
    generator = torch.Generator().manual_seed(seed)
    linear = Linear(in_features, out_features, bias=bias, ops=ops)
    linear.weight.data = torch.randn(out_features, in_features, generator=generator) * 0.05
    if bias:
        linear.bias.data = torch.randn(out_features, generator=generator)
    return linear


# --- round trips ------------------------------------------------------------------------------------

def test_int8_per_channel_round_trip_is_within_half_a_step():
    w = torch.randn(64, 200, dtype=torch.float64).float() * torch.logspace(-3, 1, 64)[:, None]
    q, scale = Q.quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    error = (w - Q.dequantize_int8_per_channel(q, scale)).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-5)).all()
    assert (q.abs().amax(dim=1) == 127).all()  # the grid spans each row's range


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_groups_round_trip_is_within_half_a_step_and_packing_is_lossless(group_size):
    w = torch.randn(48, 256) + torch.linspace(-2, 2, 256)  # groups with offsets: asymmetric grids matter
    q, scale, zero = Q.quantize_int4_groups(w, group_size)
    assert q.max() <= 15 and scale.shape == (48, 256 // group_size)
    error = (w - Q.dequantize_int4_groups(q, scale, zero)).abs().reshape(48, -1, group_size)
    assert (error <= scale[..., None] / 2 * (1 + 1e-4) + 1e-6).all()
    assert torch.equal(Q.unpack_int4(Q.pack_int4(q)), q)
    assert Q.pack_int4(q).shape == (48, 128)  # two levels per byte


def test_int4_represents_a_q4_1_grid_exactly():
    """Weights already on a 16-level grid per group (a Q4_1 GGUF) survive round-to-nearest unchanged."""
    levels = torch.randint(0, 16, (8, 64))
    levels[:, ::32] = 0
    levels[:, 1::32] = 15
    w = levels.float() * 0.01 - 0.07
    q, scale, zero = Q.quantize_int4_groups(w, 32)
    torch.testing.assert_close(Q.dequantize_int4_groups(q, scale, zero), w, atol=1e-6, rtol=0)


def test_per_token_activation_round_trip():
    x = torch.randn(10, 77) * torch.logspace(-2, 2, 10)[:, None]
    q, scale = Q.quantize_int8_per_token(x)
    assert ((x - q.float() * scale).abs() <= scale / 2 * (1 + 1e-5)).all()


# --- quantized layers against their references --------------------------------------------------------

@pytest.mark.parametrize("ops", ["reference", "default"])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scheme,group_size", SCHEMES)
def test_quantized_linear_equals_its_reference(scheme, group_size, compute_dtype, ops):
    """With the reference ops: the dequantized product. With the default ops (our CPU kernels where they build,
    which quantize activations to int8 per block of 32): within that rounding of it."""
    linear = random_linear(ops=reference_ops() if ops == "reference" else resolve_ops(None))
    config = ptq(scheme, group_size, compute_dtype=compute_dtype).quantization_config()
    layer = {"a16w8": Int8WeightOnlyLinear, "a16w4": Int4WeightOnlyLinear, "a8w8": Int8DynamicLinear}[scheme]
    layer = layer.from_float(linear, config)
    x = torch.randn(2, 5, 256).to(layer.compute_dtype)  # leading batch dims are kept
    tensors = layer.checkpoint_tensors()
    if scheme == "a16w8":
        reference = Q.reference_a16w8(x, tensors["qweight"], tensors["scales"])
    elif scheme == "a16w4":
        reference = Q.reference_a16w4(x, Q.unpack_int4(tensors["qweight"]), tensors["scales"], tensors["zeros"])
    else:
        reference = Q.reference_a8w8(x.reshape(-1, 256), tensors["qweight"], tensors["scales"]).reshape(2, 5, -1)
    out = layer(x)
    assert out.shape == (2, 5, 96) and out.dtype == layer.compute_dtype
    tolerance = 1e-4 if compute_dtype == "float32" else 2e-2
    expected = (reference + layer.bias).float()
    if layer.ops.names()[LAYER_OP[scheme]] != "reference":
        tolerance = 0.02 * expected.abs().max().item()  # int8 activations
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
    # ... and what it represents is the float layer within the scheme's error
    float_out = linear(x.float())
    relative = (out.float() - float_out).norm() / float_out.norm()
    assert relative < {"a16w8": 0.02, "a16w4": 0.15, "a8w8": 0.03}[scheme]


def test_a8w8_with_smoothing_equals_its_reference():
    linear = random_linear(bias=False)
    config = ptq("a8w8", None, algorithm="smoothquant", compute_dtype="float32").quantization_config()
    smooth = torch.rand(256) + 0.5
    layer = Int8DynamicLinear.from_float(linear, config, smooth=smooth)
    x = torch.randn(7, 256)
    tensors = layer.checkpoint_tensors()
    reference = Q.reference_a8w8(x, tensors["qweight"], tensors["scales"], tensors["smooth"])
    torch.testing.assert_close(layer(x), reference, atol=1e-4, rtol=1e-4)


def test_int4_kernel_layout_gives_back_the_exact_levels():
    linear = random_linear(bias=False)
    config = ptq("a16w4", 32).quantization_config()
    q, _, _ = Q.quantize_int4_groups(linear.weight, 32)
    layer = Int4WeightOnlyLinear.from_float(linear, config)
    assert torch.equal(Q.unpack_int4(layer.checkpoint_tensors()["qweight"]), q)


# --- algorithms ------------------------------------------------------------------------------------

def correlated_inputs(n=2048, k=256, rank=32, seed=1) -> torch.Tensor:
    """Inputs that mostly live in a low-dimensional subspace, like a transformer's hidden states."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, k, generator=generator)
    return torch.randn(n, rank, generator=generator) @ basis + 0.1 * torch.randn(n, k, generator=generator)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_gptq_output_error_is_below_round_to_nearest(group_size):
    weight = random_linear(bias=False).weight.data
    x = correlated_inputs()
    hessian = 2 * x.T @ x / x.shape[0]
    rtn = Q.dequantize_int4_groups(*Q.quantize_int4_groups(weight, group_size))
    gptq = Q.dequantize_int4_groups(*gptq_int4(weight, hessian, group_size))
    rtn_error = (x @ (weight - rtn).T).pow(2).mean()
    gptq_error = (x @ (weight - gptq).T).pow(2).mean()
    assert gptq_error < 0.5 * rtn_error


def test_smoothquant_reduces_a8w8_error_with_activation_outliers():
    linear = random_linear(bias=False)
    x = torch.randn(512, 256)
    x[:, [3, 77, 200]] *= 60  # a few outlier channels, as in real LLM activations
    float_out = linear(x)
    plain = RTN(ptq("a8w8", None, compute_dtype="float32"))
    plain_layer = Int8DynamicLinear.from_float(linear, plain.config.quantization_config())
    smoothing = RTN(ptq("a8w8", None, algorithm="smoothquant", compute_dtype="float32"))
    smoothing._observe("layer", x)
    smooth_layer = Int8DynamicLinear.from_float(linear, smoothing.config.quantization_config(),
                                                **smoothing._layer_state("layer", linear,
                                                                         smoothing.config.quantization_config()))
    plain_error = (plain_layer(x) - float_out).norm()
    smooth_error = (smooth_layer(x) - float_out).norm()
    assert smooth_error < 0.7 * plain_error


# --- whole models: convert, save, reload ----------------------------------------------------------------

def convert(folder, scheme, group_size, algorithm="rtn", **kwargs):
    model = AutoModel.from_pretrained(folder, dtype="float32")
    quantizer = (GPTQ if algorithm == "gptq" else RTN)(ptq(scheme, group_size, algorithm=algorithm, **kwargs))
    calibration = [list(range(1, 200)), list(range(50, 250))] if quantizer.needs_calibration else None
    quantizer.apply(model, calibration=calibration)
    return quantizer.convert(model)


PROMPTS = [[5, 9, 200, 31, 7], list(range(10, 40)), [77] * 3]


def greedy(model, prompts=PROMPTS, n=8):
    return generate(model, prompts, max_new_tokens=n)


@pytest.mark.parametrize("scheme,group_size,algorithm", [("a16w8", None, "rtn"), ("a16w4", 64, "rtn"),
                                                         ("a16w4", 32, "gptq"), ("a8w8", None, "smoothquant")])
def test_saved_quantized_checkpoint_reloads_to_identical_outputs(quant_folder, tmp_path, scheme, group_size,
                                                                 algorithm):
    model = convert(quant_folder, scheme, group_size, algorithm)
    assert model.quantization.scheme == scheme and model.dtype == torch.bfloat16
    out = tmp_path / "q"
    save_quantized(model, out)
    manifest = json.loads((out / "quantization.json").read_text())
    assert manifest["quantization"]["scheme"] == scheme
    assert manifest["quantization"]["group_size"] == group_size
    assert manifest["quantization"]["algorithm"] == algorithm
    assert "model.layers.0.self_attn.qkv_proj.qweight" in manifest["quantized_tensors"]
    assert "model.embed_tokens.weight" in manifest["kept_in_compute_dtype"]
    assert "lm_head.qweight" in manifest["quantized_tensors"]  # int8 beside any scheme (A16W8)
    if algorithm != "rtn":
        assert len(manifest["quantization"]["calibration"]["sha256"]) == 64

    reloaded = AutoModel.from_pretrained(out)
    assert reloaded.quantization == model.quantization
    assert torch.equal(prefill_logits(reloaded, PROMPTS), prefill_logits(model, PROMPTS))
    assert greedy(reloaded) == greedy(model)


def test_deploy_load_builds_quantized_layers_without_float_weights(quant_folder, tmp_path, monkeypatch):
    save_quantized(convert(quant_folder, "a16w4", 32), tmp_path / "q4")
    created = []
    original = Linear.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        created.append(tuple(self.weight.shape))

    monkeypatch.setattr(Linear, "__init__", spy)
    model = AutoModel.from_pretrained(tmp_path / "q4")
    # the factory builds quantized projections directly, the LM head int8 beside them: no float linear at all
    assert created == []
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 2 * 4 + 1 and isinstance(model.lm_head, Int8WeightOnlyLinear)
    for layer in layers[:-1]:
        assert layer.qweight.dtype == torch.uint8 and not hasattr(layer, "weight")
    assert not any(p.is_meta for p in model.parameters())


def test_weight_memory_meets_the_targets(quant_folder):
    a16w8 = weight_memory(convert(quant_folder, "a16w8", None))
    a16w4 = weight_memory(convert(quant_folder, "a16w4", 32))
    assert a16w8["ratio_to_float32"] <= 0.30  # int8 + one bf16 scale per row
    assert a16w4["ratio_to_float32"] <= 0.18  # 4 bits + a bf16 scale and offset per 32 weights
    assert a16w4["quantized_linear_bytes"] < a16w8["quantized_linear_bytes"]


def test_greedy_tokens_of_a16w8_stay_close_to_float(quant_folder):
    float_model = AutoModel.from_pretrained(quant_folder)
    model = convert(quant_folder, "a16w8", None, compute_dtype="float32")
    assert [row[:len(p) + 3] for row, p in zip(greedy(model), PROMPTS)] == \
           [row[:len(p) + 3] for row, p in zip(greedy(float_model), PROMPTS)]


def test_quantize_at_load_and_conflicting_flag(quant_folder, tmp_path):
    llm = LLM(str(quant_folder), quantization="a16w8", kv_cache_memory="4MiB")
    assert llm.model.quantization.scheme == "a16w8" and llm.config.dtype == "bfloat16"
    save_quantized(convert(quant_folder, "a16w8", None), tmp_path / "q8")
    with pytest.raises(ConfigError, match="quantized as a16w8.*'a16w4' conflicts"):
        LLM(str(tmp_path / "q8"), quantization="a16w4")
    assert LLM(str(tmp_path / "q8"), quantization="a16w8", kv_cache_memory="4MiB").model.quantization.scheme == "a16w8"


def test_manifest_that_does_not_match_the_tensors_is_refused(quant_folder, tmp_path):
    save_quantized(convert(quant_folder, "a16w8", None), tmp_path / "q8")
    file = tmp_path / "q8" / "quantization.json"
    manifest = json.loads(file.read_text())
    manifest["quantized_tensors"]["model.layers.0.mlp.down_proj.qweight"]["shape"] = [128, 128]
    file.write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="quantization.json: .* bytes, manifest.json says"):
        AutoModel.from_pretrained(tmp_path / "q8")  # the file list catches any edit first
    (tmp_path / "q8" / "manifest.json").unlink()  # without it, the manifest is checked against the tensors
    with pytest.raises(ModelFormatError, match=r"down_proj.qweight' is int8 \[128, 256\].*manifest says"):
        AutoModel.from_pretrained(tmp_path / "q8")
    del manifest["quantized_tensors"]["model.layers.0.mlp.down_proj.qweight"]
    file.write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="in the weight files but not in the manifest"):
        AutoModel.from_pretrained(tmp_path / "q8")
    manifest["quantization"]["scheme"] = "a4w4"
    file.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="unknown quantization scheme 'a4w4'"):
        AutoModel.from_pretrained(tmp_path / "q8")


def test_bad_configurations_give_clear_errors():
    with pytest.raises(ConfigError, match="weight_dtype 'int3'"):
        PTQConfig(weight_dtype="int3")
    with pytest.raises(ConfigError, match="unknown quantization scheme 'a4w16'"):
        PTQConfig.for_scheme("a4w16")
    with pytest.raises(ConfigError, match="group size of 32, 64 or 128"):
        PTQConfig(weight_dtype="int4", group_size=48)
    with pytest.raises(ConfigError, match="not a supported scheme"):
        PTQConfig(weight_dtype="int4", group_size=32, act_dtype="int8")
    with pytest.raises(ConfigError, match="'gptq' is implemented for a16w4"):
        PTQConfig(weight_dtype="int8", algorithm="gptq")
    with pytest.raises(ConfigError, match="group size 64 does not divide the input dimension 96"):
        Int4WeightOnlyLinear.from_float(random_linear(in_features=96), QuantizationConfig("a16w4", group_size=64))
    with pytest.raises(ConfigError, match="needs apply"):
        GPTQ(PTQConfig(weight_dtype="int4", group_size=32)).convert(torch.nn.Module())


# --- int8 KV cache -----------------------------------------------------------------------------------

def test_int8_kv_decode_attention_matches_float_attention():
    from llminfer.kv_cache.paged import DecodeBatch, PagedKVCache
    from llminfer.ops import OPS
    from llminfer.ops.attention import read_blocks

    generator = torch.Generator().manual_seed(0)
    shape = (12, 2, 8, 32)
    keys, values = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    cache = PagedKVCache(1, 12, 8, 2, 32, torch.float32, "cpu", kv_cache_dtype="int8")
    slots = torch.arange(12 * 8)
    flat = [source.transpose(1, 2).reshape(-1, 2, 32) for source in (keys, values)]  # [slots, Hkv, D]
    OPS["write_kv"].implementations["reference"].fn(*cache.layer(0), slots // 8, slots % 8, *flat)
    int8_keys, _, key_scales, _ = cache.layer(0)
    assert int8_keys.dtype == torch.int8
    dequantized = read_blocks(int8_keys, key_scales, torch.arange(12), torch.float32)
    assert ((dequantized - keys).abs() <= key_scales / 2 * 1.0001).all()
    tables = torch.tensor([[0, 1, 2, 3], [0, 1, 5, 6], [7, 8, 9, 10]])
    batch = DecodeBatch.build(tables, [30, 27, 9], 8)
    q = torch.randn(3, 4, 32, generator=generator)
    for impl in OPS["paged_decode_attention"].implementations.values():
        args = (batch.block_tables, batch.context_lens, batch.num_shared, 32 ** -0.5, None)
        exact = impl.fn(q, keys, values, None, None, *args)
        approx = impl.fn(q, *cache.layer(0), *args)
        torch.testing.assert_close(approx, exact, atol=2e-2, rtol=0, msg=impl.name)


@pytest.mark.parametrize("weights", [None, "a16w8", "a16w4", "a8w8"])
def test_int8_kv_cache_generates_like_float_and_shares_prefixes(tiny_llama_folder, weights):
    prompts = [list(range(3, 40)), list(range(3, 40)) + [7, 8], list(range(3, 20))]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    reference = LLM(str(tiny_llama_folder), dtype="float32", quantization=weights, kv_cache_memory="4MiB")
    quantized = LLM(str(tiny_llama_folder), dtype="float32", quantization=weights, kv_cache_memory="4MiB",
                    kv_cache_dtype="int8")
    assert quantized.engine.cache.quantized and quantized.engine.kv_cache_dtype == "int8"
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    alone = [o.outputs[0].token_ids for o in quantized.generate(prompts, params)]
    assert alone == expected
    again = quantized.generate(prompts, params)  # now from shared, cached int8 prefix blocks
    assert [o.outputs[0].token_ids for o in again] == alone
    assert quantized.engine.kv_cache_stats().prefix_cache_hit_tokens > 0
    assert quantized.engine.kv.pool.num_blocks > reference.engine.kv.pool.num_blocks  # same budget, ~2x blocks


# --- command line ------------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llminfer", *args], capture_output=True, text=True, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("llminfer: error:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_quantize_command_writes_a_folder_that_generate_and_perplexity_load(tiny_chat_folder, tmp_path):
    out = tmp_path / "q4"
    result = run_cli("quantize", str(tiny_chat_folder), "-o", str(out), "--scheme", "a16w4", "--group-size", "32",
                     "--algorithm", "gptq", "--calibration-tokens", "512", "--kv-cache-dtype", "int8")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "quantization.json").read_text())
    assert manifest["quantization"]["calibration"]["source"] == "python stdlib docstrings"
    assert manifest["quantization"]["kv_cache_dtype"] == "int8"
    assert {"manifest.json", "model.safetensors", "tokenizer.json", "config.json"} <= {p.name for p in out.iterdir()}
    generated = run_cli("generate", "--model", str(out), "--greedy", "-n", "5", "hello")
    assert generated.returncode == 0, generated.stderr
    ppl = run_cli("perplexity", "--model", str(out), "--max-tokens", "300", "--context-len", "100", "--json")
    assert ppl.returncode == 0, ppl.stderr
    report = json.loads(ppl.stdout)
    assert report["kv_cache_dtype"] == "int8" and report["quantization"] == "a16w4 (gptq, group 32)"
    assert report["dtype"] == "bfloat16" and 1 < report["perplexity"] < 1e4


def test_quantize_command_bad_input(tiny_llama_folder, tiny_chat_folder, tmp_path):
    assert_one_line_error(run_cli("quantize", str(tiny_llama_folder), "-o", str(tmp_path / "x"), "--scheme",
                                  "a16w4", "--group-size", "64"),
                          "group size 64 does not divide intermediate_size = 160 (valid here: 32)")
    assert_one_line_error(run_cli("quantize", str(tiny_llama_folder), "-o", str(tmp_path / "x"), "--scheme",
                                  "a16w4"), "needs --group-size")
    assert_one_line_error(run_cli("quantize", str(tiny_llama_folder), "-o", str(tmp_path / "x"), "--scheme",
                                  "a16w8", "--algorithm", "gptq"), "'gptq' is implemented for a16w4")
    assert_one_line_error(run_cli("quantize", str(tiny_chat_folder), "-o", str(tmp_path / "x"), "--scheme", "a16w4",
                                  "--group-size", "32", "--algorithm", "gptq", "--calibration",
                                  str(tmp_path / "missing.txt")), "calibration file not found")
    bad = run_cli("quantize", str(tiny_llama_folder), "-o", str(tmp_path / "x"), "--scheme", "a4w4")
    assert bad.returncode == 2 and "invalid choice: 'a4w4'" in bad.stderr
    assert not (tmp_path / "x").exists()
    q8 = tmp_path / "q8"
    assert run_cli("quantize", str(tiny_llama_folder), "-o", str(q8), "--scheme", "a16w8").returncode == 0
    assert_one_line_error(run_cli("generate", "--model", str(q8), "--quantization", "a8w8", "-n", "2", "hi"),
                          "quantized as a16w8")
    assert_one_line_error(run_cli("quantize", str(q8), "-o", str(tmp_path / "y"), "--scheme", "a16w8"),
                          "already quantized")
    assert_one_line_error(run_cli("convert", str(q8), "-o", str(tmp_path / "y")), "is a quantized checkpoint")
    info = run_cli("info", str(q8))
    assert "quantization       a16w8 (rtn), compute bfloat16" in info.stdout
    assert "stored dtype       bfloat16" in info.stdout


# How far float32 must prefer its token for the quantized model to be held to the same choice. int4 weights and
# int8 per-token activations (A8W8, +2.4% perplexity against A16W8's +0.4%) move SmolLM2's logits by up to ~1:
# measured, A8W8 flips float32 margins up to 0.59 on "Water boils at", and A16W8's int8 weights alone (reference
# ops, float32 compute, on a Xeon with AMX) flip its 0.35 margin between "0" and "1" there. The chat answer to "What
# is the capital of France?" ("The capital of France is Paris." or "L'Etoile, la Marseillaise, ...") is a near-tie
# in float32 itself
# ("The" 25.33 against "L'" 25.24), so int4 weights, int8 activations or bfloat16 rounding decide it either way.
CLEAR_MARGIN = {"a16w8": 0.5, "a16w4": 1.0, "a8w8": 1.0}


@pytest.mark.parametrize("scheme", list(CLEAR_MARGIN))
def test_greedy_chat_choices_on_smollm2_match_float32_wherever_float32_is_clear(smollm2_llm, scheme):
    """The real model quantized at load as `llminfer quantize --scheme S` does (RTN; a16w4 in groups of 32), in
    its default bfloat16 compute with the default (kernel) ops, on chat prompts and plain ones."""
    from conftest import prefill_logits

    tokenizer = smollm2_llm.tokenizer
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
               for text in ("What is the capital of France?", "Write a haiku about the sea.")]
    prompts += ["def fibonacci(n):", "Water boils at", "The three primary colors are"]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    quantized = LLM("smollm2-135m", quantization=scheme, kv_cache_memory="64MiB")
    assert quantized.model.quantization.scheme == scheme and quantized.config.dtype == "bfloat16"
    # Teacher-forced along float32's greedy text, so that one near-tie does not decide every later token: wherever
    # float32 prefers its token by a clear margin, the quantized model picks the same.
    decided = agreed = 0
    for output in smollm2_llm.generate(prompts, params):
        prefixes = [output.prompt_token_ids + output.token_ids[:i] for i in range(len(output.token_ids))]
        exact, approx = prefill_logits(smollm2_llm.model, prefixes), prefill_logits(quantized.model, prefixes)
        best = exact.topk(2, dim=-1).values
        clear = (best[:, 0] - best[:, 1]) > CLEAR_MARGIN[scheme]
        same = exact.argmax(-1) == approx.argmax(-1)
        assert same[clear].all(), (output.prompt, same.tolist())
        decided, agreed = decided + len(same), agreed + int(same.sum())
    # Near ties included. a8w8 on an AVX2-only AMD EPYC (bfloat16 emulated): 31 of 37, on the landed code too.
    assert agreed >= (0.8 if scheme == "a8w8" else 0.85) * decided


def test_bench_latency_compares_quantized_folders_in_one_run(quant_folder, tmp_path):
    save_quantized(convert(quant_folder, "a16w8", None), tmp_path / "q8")
    save_quantized(convert(quant_folder, "a16w4", 32), tmp_path / "q4")
    result = run_cli("bench", "latency", "--model", str(quant_folder), "--compare-with", str(tmp_path / "q8"),
                     str(tmp_path / "q4"), "--input-len", "16", "--output-len", "4", "--iters", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    engines = [r["engine"] for r in report["results"]]
    assert engines == [f"{quant_folder} [float32]", f"{tmp_path / 'q8'} [bfloat16, a16w8 (rtn)]",
                       f"{tmp_path / 'q4'} [bfloat16, a16w4 (rtn, group 32)]"]
    assert set(report["ratio_vs_first"]) == set(engines[1:])
    assert all(r["decode_tokens_per_s"] > 0 for r in report["results"])
