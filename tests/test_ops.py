"""The operator API: each op's implementations against a float64 reference, the choice by configuration,
refusals that name what is valid, and implementations that stay opaque under torch.compile."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from conftest import emulated_int8_linear

from llminfer import LLM, AutoModel, SamplingParams
from llminfer.errors import ConfigError
from llminfer.ops import OPS, cpu_kernels, describe_ops, parse_ops_spec, resolve_ops
from llminfer.ops.registry import Implementation

REQUIRED_OPS = {"rms_norm", "add_rms_norm", "rotary_embedding", "silu_and_mul", "gelu_tanh_and_mul", "write_kv",
                "paged_decode_attention", "prefill_attention", "linear", "int8_weight_linear",
                "int4_weight_linear", "int8_int8_linear"}


KERNELS = cpu_kernels.unavailable_reason() is None  # our C++ kernels build and run here (the default then)


def every_implementation(name: str):
    """Every implementation of the op that can run on this machine's CPU."""
    return [impl for impl in OPS[name].implementations.values() if impl.unavailable_reason("cpu") is None]


def test_every_required_op_has_a_reference_and_a_torch_library_op():
    assert REQUIRED_OPS <= set(OPS)
    for name in REQUIRED_OPS:
        impls = OPS[name].implementations
        assert impls, name
        for impl in impls.values():
            assert getattr(torch.ops.llminfer, f"{name}_{impl.name}") is not None


@pytest.mark.parametrize("impl", every_implementation("rms_norm"), ids=lambda i: i.name)
def test_rms_norm_equals_float64(impl):
    x, w = torch.randn(7, 64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    expected = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w
    torch.testing.assert_close(impl.fn(x.float(), w.float(), 1e-6).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", every_implementation("add_rms_norm"), ids=lambda i: i.name)
def test_add_rms_norm_adds_then_normalizes(impl):
    x, r, w = torch.randn(5, 32), torch.randn(5, 32), torch.randn(32)
    normed, summed = impl.fn(x, r, w, 1e-5)
    s = (x + r).double()
    torch.testing.assert_close(summed, x + r)
    torch.testing.assert_close(normed.double(), s / (s.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w.double(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", every_implementation("rotary_embedding"), ids=lambda i: i.name)
def test_rotary_embedding_rotates_each_pair_by_its_angle(impl):
    head_dim, positions = 8, torch.tensor([0, 3, 7])
    angles = torch.outer(torch.arange(10, dtype=torch.float64), 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8))
    x = torch.randn(3, 2, head_dim, dtype=torch.float64)
    got = impl.fn(positions, x.float(), angles.cos().float(), angles.sin().float()).double()
    half = head_dim // 2
    for t, p in enumerate(positions.tolist()):
        for i in range(half):  # rotate-half layout: dims i and i + D/2 form one pair
            c, s = angles[p, i].cos(), angles[p, i].sin()
            a, b = x[t, :, i], x[t, :, i + half]
            torch.testing.assert_close(got[t, :, i], a * c - b * s, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[t, :, i + half], b * c + a * s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,activation", [
    ("silu_and_mul", lambda g: g * torch.sigmoid(g)),
    ("gelu_tanh_and_mul", lambda g: 0.5 * g * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (g + 0.044715 * g ** 3)))),
])
def test_gated_activations_equal_their_formula(name, activation):
    x = torch.randn(6, 40, dtype=torch.float64)
    expected = activation(x[:, :20]) * x[:, 20:]
    for impl in every_implementation(name):
        torch.testing.assert_close(impl.fn(x.float()).double(), expected, atol=1e-5, rtol=1e-5, msg=impl.name)


@pytest.mark.parametrize("window", [None, 3])
def test_prefill_attention_equals_float64_causal_attention(window):
    q_len, length, heads, kv_heads, dim = 4, 9, 4, 2, 8
    q = torch.randn(q_len, heads, dim, dtype=torch.float64)
    k, v = torch.randn(kv_heads, length, dim, dtype=torch.float64), torch.randn(kv_heads, length, dim,
                                                                                 dtype=torch.float64)
    expected = torch.zeros_like(q)
    for i in range(q_len):
        pos = length - q_len + i
        for h in range(heads):
            scores = k[h // 2, : pos + 1] @ q[i, h] * 0.5
            if window is not None:
                scores[: max(0, pos + 1 - window)] = float("-inf")
            expected[i, h] = scores.softmax(0) @ v[h // 2, : pos + 1]
    for impl in every_implementation("prefill_attention"):
        got = impl.fn(q.float(), k.float(), v.float(), 0.5, window).double()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=impl.name)


def test_quantized_products_equal_the_dequantized_float_product():
    from llminfer.ops.linear import INT8_LAYOUTS
    from llminfer.quantization import functional as Q

    x = torch.randn(3, 64)
    w = torch.randn(16, 64)
    q8, s8 = Q.quantize_int8_per_channel(w)
    dequantized = q8.double() * s8.double()[:, None]
    for impl in every_implementation("int8_weight_linear"):
        # cpu_int8 quantizes the activations too (int8, blocks of 32): exact against that arithmetic in float64
        expected = emulated_int8_linear(x, q8, s8) if impl.name == "cpu_int8" else x.double() @ dequantized.T
        packed = INT8_LAYOUTS[impl.weight_layout].pack(q8)  # the layout its layers hold
        torch.testing.assert_close(impl.fn(x, packed, s8.float()).double(), expected, atol=1e-3, rtol=1e-3,
                                   msg=impl.name)
    xq, xs = Q.quantize_int8_per_token(x, x.abs().amax(-1, keepdim=True))
    exact = (xq.double() * xs.double()) @ dequantized.T
    for impl in every_implementation("int8_int8_linear"):
        torch.testing.assert_close(impl.fn(xq, xs, q8, s8.float()).double(), exact, atol=1e-3, rtol=1e-4)


# --- choosing implementations --------------------------------------------------------------------

def test_spec_strings_and_mappings_select_implementations():
    assert parse_ops_spec("rms_norm=reference, paged_decode_attention=batched") == {
        "rms_norm": "reference", "paged_decode_attention": "batched"}
    chosen = resolve_ops({"paged_decode_attention": "reference"}).names()
    assert chosen["paged_decode_attention"] == "reference" and set(chosen) == set(OPS)
    # the highest priority that runs here: our C++ kernel, else the batched PyTorch one
    assert resolve_ops(None).names()["paged_decode_attention"] == ("cpu" if KERNELS else "batched")


@pytest.mark.parametrize("spec,message", [
    ("no_such_op=reference", r"unknown op 'no_such_op' \(known: .*rms_norm"),
    ("rms_norm=fast", r"op 'rms_norm' has no implementation 'fast' \(implementations: reference, cpu\)"),
    ("rms_norm", r"expected OP=IMPLEMENTATION"),
])
def test_bad_specs_are_refused_naming_what_is_valid(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_ops_spec(spec)


@pytest.fixture
def cuda_only_rms_norm(monkeypatch):
    """An implementation that cannot run on CPU, at the top priority (the registry is the plug point)."""
    impl = Implementation("cuda_fused", lambda x, w, eps: x, ("cuda",), 100, lambda: None, None)
    monkeypatch.setitem(OPS["rms_norm"].implementations, "cuda_fused", impl)
    return impl


def test_an_unavailable_implementation_is_refused_when_asked_and_skipped_as_default(cuda_only_rms_norm, caplog):
    with pytest.raises(ConfigError, match=r"rms_norm=cuda_fused is not available here: runs on cuda, not cpu"):
        resolve_ops("rms_norm=cuda_fused", "cpu")
    default = "cpu" if KERNELS else "reference"
    assert resolve_ops(None, "cpu").names()["rms_norm"] == default
    missing = Implementation("needs_avx9", lambda x, w, eps: x, ("cpu",), 50, lambda: "no AVX-9 on this CPU", None)
    OPS["rms_norm"].implementations["needs_avx9"] = missing
    try:
        with caplog.at_level(logging.INFO, logger="llminfer.ops.registry"):
            assert resolve_ops(None, "cpu").names()["rms_norm"] == default
        skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
        assert skipped == ["op rms_norm: skipping implementation 'needs_avx9' (no AVX-9 on this CPU)"]
    finally:
        del OPS["rms_norm"].implementations["needs_avx9"]
    rows = {row["op"]: row for row in describe_ops("cpu")}
    assert rows["rms_norm"]["chosen"] == default
    assert {i["name"]: i["unavailable"] for i in rows["rms_norm"]["implementations"]}["cuda_fused"] == \
        "runs on cuda, not cpu"


def test_cli_refuses_an_unknown_op_in_one_line_with_exit_2(tiny_llama_folder):
    result = subprocess.run([sys.executable, "-m", "llminfer", "generate", "-m", str(tiny_llama_folder),
                             "--ops", "rms_norm=fast", "hello"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "llminfer: error: ops: op 'rms_norm' has no implementation 'fast' (implementations: reference, cpu)"]


def test_info_ops_lists_every_op_and_the_chosen_implementation():
    result = subprocess.run([sys.executable, "-m", "llminfer", "info", "--ops"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in REQUIRED_OPS:
        assert f"\n{name}: {name}(" in result.stdout
    assert ("* cpu" if KERNELS else "* batched") in result.stdout and "  reference" in result.stdout


def test_the_choice_reaches_every_layer_without_touching_the_model_file(tiny_llama_folder):
    llm = LLM(str(tiny_llama_folder), ops="paged_decode_attention=reference")
    assert llm.config.ops == {"paged_decode_attention": "reference"}
    assert llm.engine.runner.backend.ops is llm.model.ops
    layers_ops = {id(m.ops) for m in llm.model.modules() if hasattr(m, "ops")}
    assert layers_ops == {id(llm.model.ops)}
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    default = LLM(str(tiny_llama_folder))
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    assert [o.token_ids for o in llm.generate(prompts, params)] == \
        [o.token_ids for o in default.generate(prompts, params)]


def test_ops_are_single_opaque_nodes_under_torch_compile(tiny_llama_folder):
    model = AutoModel.from_pretrained(tiny_llama_folder)
    norm, mlp = model.model.layers[0].post_attention_layernorm, model.model.layers[0].mlp
    targets = []

    def record(graph_module, example_inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: mlp(norm(x)), backend=record, fullgraph=True)
    x = torch.randn(3, model.config.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), mlp(norm(x)))
    chosen = model.ops.names()
    for op in ("rms_norm", "silu_and_mul", "linear"):
        assert f"llminfer.{op}_{chosen[op]}.default" in targets
