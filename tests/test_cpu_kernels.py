"""Our C++ CPU kernels against a float64 emulation of the same arithmetic and against the float64 product, on
every instruction-set variant this CPU runs (an AVX-512 machine also runs the AVX2 path)."""

import pytest
import torch
from conftest import emulated_int8_linear

from llminfer.ops import cpu_kernels, resolve_ops

pytestmark = pytest.mark.skipif(cpu_kernels.unavailable_reason() is not None,
                                reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")


@pytest.fixture(scope="module")
def kernels():
    module = cpu_kernels.kernels()
    assert module is not None, cpu_kernels._build_error
    return module


def test_every_instruction_set_variant_this_cpu_runs_is_listed(kernels):
    isas = kernels.supported_isas()
    assert "avx2" in isas  # the requirement for building at all
    if "avx512_vnni" in cpu_kernels.cpu_flags():
        assert "avx512_vnni" in isas


@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (1, 1536, 576), (3, 64, 100), (16, 96, 7), (5, 32, 1)])
def test_int8_linear_equals_the_emulated_arithmetic_and_is_close_to_the_float_product(kernels, m, k, n):
    generator = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=generator)
    x[0, :32] = 0.0  # a block of zeros: scale 0, no division by zero
    qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    scales = torch.rand(n, generator=generator) * 0.02
    expected = emulated_int8_linear(x, qweight, scales)
    exact = x.double() @ (qweight.double() * scales.double()[:, None]).T
    for isa in kernels.supported_isas():
        y = kernels.int8_linear(x, qweight, scales, isa)
        assert y.shape == (m, n) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        # int8 activations: the error against the float product is a fraction of a percent of its scale
        assert (y.double() - exact).abs().max() <= 0.02 * exact.abs().max()


def test_int8_linear_refuses_what_it_cannot_compute(kernels):
    x, qweight, scales = torch.randn(2, 48), torch.zeros(4, 48, dtype=torch.int8), torch.ones(4)
    with pytest.raises(RuntimeError, match="K = 48 is not a multiple of 32"):
        kernels.int8_linear(x, qweight, scales, "auto")
    with pytest.raises(RuntimeError, match="unknown instruction set 'sse9'"):
        kernels.int8_linear(torch.randn(2, 64), torch.zeros(4, 64, dtype=torch.int8), scales, "sse9")


def test_the_op_implementation_falls_back_to_the_reference_where_the_kernel_does_not_apply(kernels):
    ops = resolve_ops({"int8_weight_linear": "cpu_int8"})
    reference = resolve_ops({"int8_weight_linear": "reference"})
    qweight = torch.randint(-127, 128, (64, 96), dtype=torch.int8)
    scales = torch.rand(64) * 0.01
    big = torch.randn(40, 96)  # more rows than SMALL_BATCH: prefill keeps the reference's product
    torch.testing.assert_close(ops.int8_weight_linear(big, qweight, scales),
                               reference.int8_weight_linear(big, qweight, scales))
    small = torch.randn(2, 96, dtype=torch.bfloat16)
    y = ops.int8_weight_linear(small, qweight, scales.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), emulated_int8_linear(small.float(), qweight, scales.bfloat16().float()),
                               rtol=1e-2, atol=1e-2)


def test_an_a16w8_model_with_the_kernel_gives_the_references_logits_within_int8_activation_error(
        tiny_llama_folder):
    from llminfer.model import AutoModel

    prompt = [5, 9, 200, 31, 7, 11, 64, 3, 99, 150, 2, 42]  # 12 rows: the kernel's path (at most SMALL_BATCH)
    logits = {impl: AutoModel.from_pretrained(tiny_llama_folder, dtype="float32", quantization="a16w8",
                                              ops={"int8_weight_linear": impl}).sequence_logits(prompt)
              for impl in ("reference", "cpu_int8")}
    difference = (logits["cpu_int8"] - logits["reference"]).abs().max()
    assert 0 < difference <= 0.02 * logits["reference"].abs().max()  # not the same code path, but close
