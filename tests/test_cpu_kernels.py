"""Our C++ CPU kernels against a float64 emulation of the same arithmetic, against the float64 product, and the
fused decode ops against their reference ops, on every instruction-set variant this CPU runs (an AVX-512 machine
also runs the AVX2 path). Nothing here times anything."""

import pytest
import torch
import torch.nn.functional as F
from conftest import emulated_int4_linear, emulated_int8_linear

from llminfer.ops import OPS, cpu_kernels, reference_ops, resolve_ops
from llminfer.ops.attention import paged_decode_attention_reference, quantize_kv, write_kv_reference
from llminfer.ops.linear import INT4_LAYOUTS, INT8_LAYOUTS
from llminfer.quantization import functional as Q

pytestmark = pytest.mark.skipif(cpu_kernels.unavailable_reason() is not None,
                                reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
BLOCKS32, TILES = INT4_LAYOUTS["blocks32"], INT8_LAYOUTS["tiles4x64"]


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
    if "avx_vnni" in cpu_kernels.cpu_flags():
        assert "avx_vnni" in isas


# --- quantized products --------------------------------------------------------------------------------------

SHAPES = [(1, 576, 1536), (1, 1536, 576), (3, 64, 100), (16, 96, 7), (5, 32, 1), (37, 160, 45), (2, 48, 10),
          (6, 100, 13)]  # K = 48, 100: a last block K does not fill


def random_activations(m, k, generator):
    x = torch.randn(m, k, generator=generator) * torch.logspace(-1, 1, m)[:, None]
    x[0, :32] = 0.0  # a block of zeros: scale 0, no division by zero
    return x


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_linear_equals_the_emulated_arithmetic_and_is_close_to_the_float_product(kernels, m, k, n):
    generator = torch.Generator().manual_seed(m * 1000 + k + n)
    x = random_activations(m, k, generator)
    qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    scales = torch.rand(n, generator=generator) * 0.02
    expected = emulated_int8_linear(x, qweight, scales)
    exact = x.double() @ (qweight.double() * scales.double()[:, None]).T
    tiles = TILES.pack(qweight)
    assert tiles.shape == (-(-n // 4), -(-k // 64), 4, 64)  # rows padded to tiles of 4, K to 64
    for isa in kernels.supported_isas():
        y = kernels.int8_linear(x, tiles, scales, isa)
        assert y.shape == (m, n) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        # int8 activations: the error against the float product is a fraction of a percent of its scale
        assert (y.double() - exact).abs().max() <= 0.02 * exact.abs().max()
        # bfloat16 in (and bfloat16 scales): the same arithmetic on the rounded inputs, rounded out
        y16 = kernels.int8_linear(x.bfloat16(), tiles, scales.bfloat16(), isa)
        assert y16.dtype == torch.bfloat16
        expected16 = emulated_int8_linear(x.bfloat16().float(), qweight, scales.bfloat16().float())
        torch.testing.assert_close(y16.double(), expected16, rtol=1e-2, atol=1e-2 * expected16.abs().max().item())


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m,k,n", [(1, 576, 960), (4, 128, 9), (17, 1536, 33), (1, 640, 5)])
def test_int4_linear_equals_the_emulated_arithmetic_and_is_close_to_the_float_product(kernels, m, k, n,
                                                                                      group_size):
    if k % group_size:
        pytest.skip("the group size does not divide K")
    generator = torch.Generator().manual_seed(m * 1000 + k + n + group_size)
    x = random_activations(m, k, generator)
    weight = torch.randn(n, k, generator=generator) * 0.05
    levels, scale, zero = Q.quantize_int4_groups(weight, group_size)
    qweight, table = BLOCKS32.pack(levels, scale, zero, group_size, torch.bfloat16)
    assert qweight.shape == (n, -(-k // 64) * 32)  # K padded to 64 (640 = 10 x 64, 576 = 9 x 64, 128, 1536)
    expected = emulated_int4_linear(x, levels, table)
    dequantized = Q.dequantize_int4_groups(levels, scale, zero).double()
    exact = x.double() @ dequantized.T
    for isa in kernels.supported_isas():
        y = kernels.int4_linear(x, qweight, table, isa)
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        assert (y.double() - exact).abs().max() <= 0.02 * exact.abs().max()
        y16 = kernels.int4_linear(x.bfloat16(), qweight, table, isa)
        expected16 = emulated_int4_linear(x.bfloat16().float(), levels, table)
        torch.testing.assert_close(y16.double(), expected16, rtol=1e-2, atol=1e-2 * expected16.abs().max().item())


def test_the_blocks32_layout_gives_back_levels_and_a_grid_that_pack_to_the_same_tensors(kernels):
    weight = torch.randn(10, 96) * 0.1
    weight[3, :32] = 0.25  # a constant group: its scale is clamped, never zero
    levels, scale, zero = Q.quantize_int4_groups(weight, 32)
    qweight, table = BLOCKS32.pack(levels, scale, zero, 32, torch.bfloat16)
    assert torch.equal(BLOCKS32.levels(qweight, table, 32, 96), levels)
    again = BLOCKS32.pack(levels, *BLOCKS32.grid(table, 32, 96), 32, torch.bfloat16)
    assert torch.equal(again[0], qweight) and torch.equal(again[1], table)
    # the dequantized matrix a prompt multiplies by is the table's w = q * s + m
    t = table.float()[:, :3].repeat_interleave(32, dim=1)
    expected = levels.float() * t[..., 0] + t[..., 1]
    torch.testing.assert_close(kernels.dequantize_int4(qweight, table, 96, torch.float32), expected)
    torch.testing.assert_close(kernels.dequantize_int4(qweight, table, 96, torch.bfloat16), expected.bfloat16())


def float_paths(kernels, dtype):
    has_512 = kernels.has_avx512_bf16() if dtype == torch.bfloat16 else "avx512f" in cpu_kernels.cpu_flags()
    return ["avx2"] + (["avx512"] if has_512 else [])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (1, 1536, 576), (3, 64, 9), (4, 100, 13), (7, 48, 5), (1, 40, 3)])
def test_float_linear_is_the_float64_product_rounded_to_its_dtype(kernels, m, k, n, dtype):
    generator = torch.Generator().manual_seed(m * 100 + k + n)
    x = torch.randn(m, k, generator=generator).to(dtype)
    w = torch.randn(n, k, generator=generator).to(dtype)
    exact = x.double() @ w.double().T
    # float32 sums of exact products, then one rounding to the dtype (bfloat16: 2**-8 relative)
    rtol = 2 ** -8 if dtype == torch.bfloat16 else 1e-5
    for isa in float_paths(kernels, dtype):
        y = kernels.float_linear(x, w, isa)
        assert y.dtype == dtype and y.shape == (m, n)
        torch.testing.assert_close(y.double(), exact, rtol=rtol, atol=1e-5 * k)


def test_the_linear_op_takes_the_float_kernel_for_decode_rows_and_f_linear_otherwise(kernels):
    from llminfer.ops.linear import DECODE_ROWS

    ops = resolve_ops(None)
    assert ops.names()["linear"] == "cpu_float"
    w, bias = torch.randn(24, 96), torch.randn(24)
    for rows in (1, DECODE_ROWS, DECODE_ROWS + 1, 70):
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            x = torch.randn(rows, 96).to(dtype)
            y = ops.linear(x, w.to(dtype), bias.to(dtype))
            assert y.dtype == dtype
            exact = x.double() @ w.to(dtype).double().T + bias.to(dtype).double()
            torch.testing.assert_close(y.double(), exact, rtol=1e-2, atol=1e-2)
    with pytest.raises(RuntimeError, match=r"weight: BFloat16 \[N, 96\] contiguous"):
        kernels.float_linear(torch.randn(1, 96).bfloat16(), torch.randn(4, 64).bfloat16(), "auto")
    with pytest.raises(RuntimeError, match=r"weight: Float \[N, 96\] contiguous"):
        kernels.float_linear(torch.randn(1, 96), torch.randn(4, 96).bfloat16(), "auto")
    with pytest.raises(RuntimeError, match="unknown instruction set 'sse9'"):
        kernels.float_linear(torch.randn(1, 96), w, "sse9")


def test_the_tiles4x64_layout_gives_back_the_rows_and_dequantizes_to_them(kernels):
    for n, k in [(10, 96), (4, 64), (1, 48), (7, 130)]:
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scales = torch.rand(n)
        tiles = TILES.pack(q)
        assert torch.equal(TILES.rows(tiles, n, k), q)
        assert tiles.flatten()[:64].tolist() == F.pad(q[0], (0, max(0, 64 - k)))[:64].tolist()  # row 0, chunk 0 first
        expected = q.float() * scales[:, None]
        torch.testing.assert_close(kernels.dequantize_int8(tiles, scales, k, torch.float32), expected)
        torch.testing.assert_close(kernels.dequantize_int8(tiles, scales, k, torch.bfloat16), expected.bfloat16())


def test_the_kernels_refuse_what_they_cannot_compute(kernels):
    scales = torch.ones(4)
    with pytest.raises(RuntimeError, match=r"qweight: int8 \[1, Kp / 64, 4, 64\] contiguous \(tiles4x64 layout\)"):
        kernels.int8_linear(torch.randn(2, 64), torch.zeros(4, 64, dtype=torch.int8), scales, "auto")
    tiles = TILES.pack(torch.zeros(4, 64, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="x has 128 columns, the weight 64 padded columns"):
        kernels.int8_linear(torch.randn(2, 128), tiles, scales, "auto")
    with pytest.raises(RuntimeError, match="unknown instruction set 'sse9'"):
        kernels.int8_linear(torch.randn(2, 64), tiles, scales, "sse9")
    with pytest.raises(RuntimeError, match="x: float32 or bfloat16"):
        kernels.int8_linear(torch.randn(2, 64).half(), tiles, scales, "auto")
    with pytest.raises(RuntimeError, match=r"table: float16 \[N, Kp / 32, 2\]"):
        kernels.int4_linear(torch.randn(1, 64), torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 2, 2), "auto")
    with pytest.raises(RuntimeError, match="x has 128 columns, the weight 64 padded levels"):
        kernels.int4_linear(torch.randn(1, 128), torch.zeros(4, 32, dtype=torch.uint8),
                            torch.zeros(4, 2, 2, dtype=torch.half), "auto")


def test_the_op_implementations_cover_every_row_count_and_fall_back_for_other_dtypes(kernels):
    ops, reference = resolve_ops(None), reference_ops()
    assert ops.names()["int8_weight_linear"] == "cpu_int8" and ops.names()["int4_weight_linear"] == "cpu_int4"
    qweight = torch.randint(-127, 128, (64, 96), dtype=torch.int8)
    scales = torch.rand(64) * 0.01
    tiles = TILES.pack(qweight)  # the layout cpu_int8 reads
    for rows in (1, 40, 100, 300):  # decode, a small batch, prompts (from 64 | 256 rows: the dequantized matmul)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, 96, dtype=dtype)
            y = ops.int8_weight_linear(x, tiles, scales)
            assert y.dtype == dtype
            expected = emulated_int8_linear(x.float(), qweight, scales)
            torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    half = torch.randn(3, 96, dtype=torch.float16)  # not a kernel dtype: the dequantized weight's float product
    y = ops.int8_weight_linear(half, tiles, scales.half())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, reference.int8_weight_linear(half, qweight, scales.half()), rtol=3e-2, atol=3e-3)
    exact = half.double() @ (qweight.double() * scales.half().double()[:, None]).T
    torch.testing.assert_close(y.double(), exact, rtol=1e-2, atol=1e-2 * exact.abs().max().item())


def test_an_a16w4_model_with_the_kernel_gives_the_references_logits_within_int8_activation_error(
        tiny_llama_folder):
    from llminfer.model import AutoModel

    prompt = [5, 9, 200, 31, 7, 11, 64, 3, 99, 150, 2, 42]
    logits = {name: AutoModel.from_pretrained(tiny_llama_folder, dtype="float32", quantization="a16w4",
                                              ops=ops).sequence_logits(prompt)
              for name, ops in (("reference", reference_ops().names()), ("kernels", None))}
    difference = (logits["kernels"] - logits["reference"]).abs().max()
    assert 0 < difference <= 0.03 * logits["reference"].abs().max()  # not the same code path, but close


# --- fused decode ops against their references ---------------------------------------------------------------

@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def dtype(request):
    return request.param


def close(got, expected, dtype):
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)


def test_norms_and_gated_activations_equal_their_references(kernels, dtype):
    x, r, w = torch.randn(5, 576, dtype=dtype), torch.randn(5, 576, dtype=dtype), torch.randn(576, dtype=dtype)
    cpu, ref = resolve_ops(None), reference_ops()
    close(cpu.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), dtype)
    (normed, summed), (normed_ref, summed_ref) = cpu.add_rms_norm(x, r, w, 1e-5), ref.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(summed, summed_ref)  # the add rounds as the reference's does
    close(normed, normed_ref, dtype)
    gate_up = torch.randn(3, 2 * 1536, dtype=dtype) * 3
    for name in ("silu_and_mul", "gelu_tanh_and_mul"):
        close(getattr(cpu, name)(gate_up), getattr(ref, name)(gate_up), dtype)
    strided = torch.randn(3, 4000, dtype=dtype)[:, : 2 * 1536]  # a view of wider rows, as a split gives
    close(cpu.silu_and_mul(strided), ref.silu_and_mul(strided), dtype)


def test_rotary_embedding_equals_the_reference_on_a_split_view(kernels, dtype):
    cpu, ref = resolve_ops(None), reference_ops()
    angles = torch.outer(torch.arange(64, dtype=torch.float32), 1.0 / 10000 ** (torch.arange(0, 64, 2) / 64))
    qkv = torch.randn(4, (9 + 3 + 3) * 64, dtype=dtype)
    qk = qkv[:, : 12 * 64].view(4, 12, 64)  # rows of the fused projection: a strided view
    positions = torch.tensor([0, 5, 17, 63])
    close(cpu.rotary_embedding(positions, qk, angles.cos(), angles.sin()),
          ref.rotary_embedding(positions, qk, angles.cos(), angles.sin()), dtype)
    with pytest.raises(RuntimeError, match="position 64 is outside the rotary table"):
        kernels.rotary_embedding(torch.tensor([64, 0, 0, 0]), qk, angles.cos(), angles.sin())


def caches(num_blocks, heads, block_size, dim, dtype, quantized):
    shape = (num_blocks, heads, block_size, dim)
    storage = torch.int8 if quantized else dtype
    scales = (lambda: torch.zeros(*shape[:-1], 1)) if quantized else (lambda: None)
    return torch.zeros(shape, dtype=storage), torch.zeros(shape, dtype=storage), scales(), scales()


@pytest.mark.parametrize("quantized", [False, True], ids=["float_cache", "int8_cache"])
def test_write_kv_stores_what_the_reference_stores(kernels, dtype, quantized):
    k, v = torch.randn(5, 2, 64, dtype=dtype), torch.randn(5, 2, 64, dtype=dtype)
    blocks, offsets = torch.tensor([3, 3, 0, 7, 1]), torch.tensor([0, 1, 15, 4, 9])
    ours, theirs = caches(8, 2, 16, 64, dtype, quantized), caches(8, 2, 16, 64, dtype, quantized)
    resolve_ops(None).write_kv(*ours, blocks, offsets, k, v)
    write_kv_reference(*theirs, blocks, offsets, k, v)
    for mine, reference in zip(ours, theirs):
        if mine is not None:
            assert torch.equal(mine, reference)
    with pytest.raises(RuntimeError, match=r"slot \(8, 0\) is outside the cache"):
        kernels.write_kv(*ours, torch.tensor([8]), torch.tensor([0]), k[:1], v[:1])


def float64_attention(q, keys, values, length, scale, window):
    """One sequence's decode attention in float64 over its history [Hkv, L, D] (GQA by repetition)."""
    group = q.shape[0] // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0).double(), values.repeat_interleave(group, 0).double()
    scores = torch.einsum("hd,hld->hl", q.double(), keys) * scale
    if window is not None:
        scores[:, : max(0, length - window)] = float("-inf")
    return torch.einsum("hl,hld->hd", scores.softmax(-1), values)


@pytest.mark.parametrize("quantized", [False, True], ids=["float_cache", "int8_cache"])
@pytest.mark.parametrize("heads,kv_heads,window", [(9, 3, None), (8, 8, None), (8, 1, 5), (4, 2, 40)])
@pytest.mark.parametrize("dim", [64, 80], ids=["chunked", "two_pass"])  # 80: no chunked kernel for this head size
def test_paged_decode_attention_reads_block_tables_with_holes_and_shared_prefixes(kernels, dtype, quantized,
                                                                                   heads, kv_heads, window, dim):
    block_size, generator = 16, torch.Generator().manual_seed(heads * 10 + kv_heads)
    key_cache, value_cache, key_scales, value_scales = caches(12, kv_heads, block_size, dim, dtype, quantized)
    history = torch.randn(12, kv_heads, block_size, dim, generator=generator).to(dtype)
    values_history = torch.randn(12, kv_heads, block_size, dim, generator=generator).to(dtype)
    if quantized:
        (key_cache[:], key_scales[:]), (value_cache[:], value_scales[:]) = quantize_kv(history), \
            quantize_kv(values_history)
    else:
        key_cache[:], value_cache[:] = history, values_history
    # sequence 0 and 1 share their first two blocks (a common prefix); their own blocks are not in order and
    # leave holes (blocks 4, 6, 7 belong to nobody); tables are padded with 0 past each sequence's length
    tables = torch.tensor([[2, 9, 5, 0], [2, 9, 11, 3], [8, 0, 0, 0]])
    lengths = torch.tensor([40, 61, 7])
    q = torch.randn(3, heads, dim, generator=generator).to(dtype)
    got = resolve_ops(None).paged_decode_attention(q, key_cache, value_cache, key_scales, value_scales, tables,
                                                   lengths, 2, 0.125, window)
    reference = paged_decode_attention_reference(q, key_cache, value_cache, key_scales, value_scales, tables,
                                                 lengths, 2, 0.125, window)
    by_isa = {isa: kernels.paged_decode_attention(q, key_cache, value_cache, key_scales, value_scales, tables,
                                                  lengths, 0.125, window, isa)
              for isa in ["avx2"] + (["avx512"] if "avx512f" in cpu_kernels.cpu_flags() else [])}
    for isa, ours in by_isa.items():  # 8 or 16 positions a chunk (or two passes): the same attention
        close(ours, got, dtype)
    for i, length in enumerate(lengths.tolist()):
        blocks = tables[i, : -(-length // block_size)]

        def read(cache, scales):
            stored = cache[blocks].double() * (scales[blocks].double() if quantized else 1)
            return stored.transpose(0, 1).flatten(1, 2)[:, :length]

        expected = float64_attention(q[i], read(key_cache, key_scales), read(value_cache, value_scales), length,
                                     0.125, window)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[i].double(), expected, atol=tolerance, rtol=tolerance)
    close(got, reference, dtype if not quantized else torch.bfloat16)  # the reference rounds dequantized values
    with pytest.raises(RuntimeError, match="sequence 2: length 70 does not fit its 4 blocks"):
        kernels.paged_decode_attention(q, key_cache, value_cache, key_scales, value_scales, tables,
                                       torch.tensor([1, 1, 70]), 0.125, window, "auto")


# --- falling back ----------------------------------------------------------------------------------------------

def test_without_the_extension_the_reference_ops_run_and_generate_the_same_tokens(tiny_llama_folder, monkeypatch,
                                                                                   caplog):
    from llminfer import LLM, SamplingParams

    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], list(range(20, 60))]
    with_kernels = [o.token_ids for o in LLM(str(tiny_llama_folder)).generate(prompts, params)]
    monkeypatch.setattr(cpu_kernels, "_build_error", "the CPU kernels failed to build: (forced by a test)")
    with caplog.at_level("INFO", logger="llminfer.ops.registry"):
        fallback = LLM(str(tiny_llama_folder))
    chosen = fallback.model.ops.names()
    assert all(not chosen[name].startswith("cpu") for name in OPS)
    assert any("forced by a test" in r.getMessage() for r in caplog.records)  # said, not silent
    assert [o.token_ids for o in fallback.generate(prompts, params)] == with_kernels


def test_float32_greedy_tokens_of_smollm2_with_the_fused_ops_equal_the_reference_ops(smollm2_llm):
    """64 greedy tokens on 4 prompts: float32 with our fused ops (norms, rotary, attention, activations) chooses
    exactly what the plain-PyTorch reference ops choose."""
    from llminfer import LLM, SamplingParams

    assert smollm2_llm.model.ops.names()["paged_decode_attention"] == "cpu"
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time"]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    reference = LLM("smollm2-135m", dtype="float32", ops=reference_ops().names(), kv_cache_memory="64MiB")
    assert [o.token_ids for o in smollm2_llm.generate(prompts, params)] == \
        [o.token_ids for o in reference.generate(prompts, params)]


def test_a_failed_build_is_said_once_and_the_reference_ops_are_chosen(monkeypatch, caplog):
    def failing_build():
        raise RuntimeError("Error building extension\nquantized_linear.cpp:1:1: error: no compiler today\nninja: build "
                           "stopped: subcommand failed.")

    monkeypatch.setattr(cpu_kernels, "_build_error", None)
    monkeypatch.setattr(cpu_kernels, "_load", failing_build)
    with caplog.at_level("INFO"):
        chosen = resolve_ops(None).names()
    assert not any(impl.startswith("cpu") for impl in chosen.values())
    assert chosen["paged_decode_attention"] == "batched" and chosen["int4_weight_linear"] == "reference"
    failures = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert failures == ["the CPU kernels failed to build: quantized_linear.cpp:1:1: error: no compiler today; "
                        "using the reference ops"]


def test_a_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path, caplog):
    import os
    import time

    lock = tmp_path / "lock"
    lock.touch()
    cpu_kernels.remove_stale_lock(tmp_path)  # someone is building right now: wait for them
    assert lock.exists()
    old = time.time() - cpu_kernels.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING"):
        cpu_kernels.remove_stale_lock(tmp_path)
    assert not lock.exists() and "by a build that did not finish" in caplog.text
    cpu_kernels.remove_stale_lock(tmp_path)  # nothing to remove: nothing happens


@pytest.mark.parametrize("rows", [1, 3, 8, 13, 70])
@pytest.mark.parametrize("n, k, group_size", [(37, 96, 32), (64, 576, 64), (8, 40, 32)])
def test_panels8_int4_gemm_matches_a_float64_product_and_the_layout_reads_back(kernels, rows, n, k, group_size):
    """The panels8 layout packs and reads back bit for bit (levels, scales, zero points; N and K not multiples of
    the panel or block), and its kernel for any row count is within int8 activation rounding of the float64
    product with the same weights."""
    layout = INT4_LAYOUTS["panels8"]
    generator = torch.Generator().manual_seed(rows * 1000 + n)
    groups = -(-k // group_size)
    levels = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=generator)
    scale = torch.rand(n, groups, generator=generator) * 0.05 + 0.001
    zero = torch.randint(0, 16, (n, groups), generator=generator).float()
    qweight, table = layout.pack(levels, scale, zero, group_size, torch.float32)
    assert torch.equal(layout.levels(qweight, table, group_size, k), levels)
    scale_back, zero_back = layout.grid(table, group_size, k)
    assert all(torch.equal(a, b) for a, b in zip(layout.pack(levels, scale_back, zero_back, group_size,
                                                             torch.float32), (qweight, table)))
    s = scale.half().double().repeat_interleave(group_size, 1)[:, :k]
    minimum = (-zero * scale).half().double().repeat_interleave(group_size, 1)[:, :k]
    weight = levels.double() * s + minimum
    x = torch.randn(rows, k, generator=generator)
    expected = x.double() @ weight.T
    results = {}
    for isa in kernels.supported_isas():  # AVX2, and the VNNI paths where this CPU has them
        y = kernels.int4_gemm(x, qweight, table, n, isa)
        assert y.shape == (rows, n)
        assert ((y.double() - expected).abs().max() / expected.abs().max()).item() < 2e-2, isa
        y_bf16 = kernels.int4_gemm(x.bfloat16(), qweight, table, n, isa)
        assert ((y_bf16.double() - expected).abs().max() / expected.abs().max()).item() < 3e-2, isa
        results[isa] = y
    # the same int8 activations times the same levels: every path's integer sums are exact, so they agree to
    # float rounding of the per-block scaling
    for isa, y in results.items():
        torch.testing.assert_close(y, results["avx2"], rtol=1e-5, atol=1e-5 * y.abs().max().item(), msg=isa)
