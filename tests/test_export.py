"""ONNX export and the lite runtime: the exported graph's greedy tokens equal the engine's (float32 and A16W8),
the lite runtime never imports torch, and bad folders or models give one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llminfer import LLM, SamplingParams
from llminfer.errors import ModelFormatError, UnsupportedModelError
from llminfer.export.onnx import export_onnx
from llminfer.ops import reference_ops

PROMPTS = [[5, 9, 200, 31, 7], list(range(10, 40)), [77] * 3]  # 30 tokens: past the Mistral window of 12
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def engine_tokens(model: str | Path, prompts, params=GREEDY, **options) -> list[list[int]]:
    llm = LLM(str(model), kv_cache_memory="16MiB", **options)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def lite_tokens(folder: Path, prompts, params=GREEDY) -> list[list[int]]:
    from llminfer.lite import LiteModel

    return [o.token_ids for o in LiteModel(folder).generate(prompts, params)]


def run_lite(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llminfer.cli.lite", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def exported_tiny(tiny_hf, tmp_path_factory):
    variant, _, folder = tiny_hf  # logits at every position, to compare them with transformers'
    return folder, export_onnx(str(folder), tmp_path_factory.mktemp(f"onnx-{variant}") / "out", all_logits=True)


@pytest.fixture(scope="module")
def exported_llama(tiny_llama_folder, tmp_path_factory):
    return export_onnx(str(tiny_llama_folder), tmp_path_factory.mktemp("onnx-llama") / "out")


def test_lite_greedy_tokens_equal_the_engine_on_tiny_models(exported_tiny):
    source, exported = exported_tiny
    assert lite_tokens(exported, PROMPTS) == engine_tokens(source, PROMPTS)


def test_lite_logits_at_every_position_equal_transformers(tiny_hf, exported_tiny):
    from llminfer.lite import LiteModel

    _, hf_model, _ = tiny_hf
    model = LiteModel(exported_tiny[1])
    prompt = PROMPTS[1]
    logits, cache = model.step(np.array([prompt]), np.ones((1, len(prompt))), np.arange(len(prompt))[None],
                               model.empty_cache())
    with torch.no_grad():
        expected = hf_model(torch.tensor([prompt])).logits.numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    cfg = hf_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert cache[0].shape == (1, cfg.num_key_value_heads, len(prompt), head_dim)


def test_export_folder_and_manifest(exported_tiny, exported_llama):
    source, exported = exported_tiny
    manifest = json.loads((exported / "export.json").read_text())
    assert manifest["format"] == "llminfer-onnx" and manifest["opset"] == 18 and manifest["dtype"] == "float32"
    assert len(manifest["source_sha256"]) == 64
    assert [i["name"] for i in manifest["inputs"]][:4] == ["input_ids", "attention_mask", "position_ids", "past_key_0"]
    config = json.loads((source / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    # [B, Hkv, P, D], P dynamic
    assert manifest["inputs"][3]["shape"] == ["batch", config["num_key_value_heads"], "past_sequence", head_dim]
    assert manifest["logits"] == "all" and manifest["outputs"][0]["shape"] == ["batch", "sequence", 320]
    generation_export = json.loads((exported_llama / "export.json").read_text())
    assert generation_export["logits"] == "last" and generation_export["outputs"][0]["shape"] == ["batch", 1, 320]
    assert manifest["validation"]["max_abs_difference_relative"] <= manifest["validation"]["tolerance"]
    # Weights live outside the graph file: every weight matrix is an external initializer (file sizes cannot tell:
    # a tiny model's graph, with its metadata, is as large as its weights).
    import onnx

    graph = onnx.load(str(exported / "model.onnx"), load_external_data=False).graph
    matrices = [t for t in graph.initializer if len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 64 * 64]
    assert matrices and all(t.data_location == onnx.TensorProto.EXTERNAL for t in matrices)
    assert set(manifest["files"]) == {p.name for p in exported.iterdir()} - {"export.json"}


def test_lite_runtime_batches_padded_prompts_like_single_ones(exported_tiny):
    """The graph takes a left-padded batch: each row's logits equal the row run alone."""
    from llminfer.lite import LiteModel

    model = LiteModel(exported_tiny[1])
    short, long = PROMPTS[0], PROMPTS[1][:8]
    ids = np.array([[0] * 3 + short, long])
    mask = np.array([[0] * 3 + [1] * 5, [1] * 8])
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    batched, _ = model.step(ids, mask, positions, model.empty_cache(2))
    for row, prompt in enumerate([short, long]):
        alone, _ = model.step(np.array([prompt]), np.ones((1, len(prompt))), np.arange(len(prompt))[None],
                              model.empty_cache())
        np.testing.assert_allclose(batched[row, -1], alone[0, -1], rtol=1e-4, atol=1e-5)


def test_lite_cli_chat_streams_the_engines_text_without_importing_torch(tiny_chat_folder, tmp_path):
    exported = export_onnx(str(tiny_chat_folder), tmp_path / "chat")
    args = ["--greedy", "-n", "24", "--chat", "--system", "be brief", "hello world"]
    ours = run_lite("generate", "--model", str(exported), *args)
    engine = subprocess.run([sys.executable, "-m", "llminfer.cli.main", "generate", "--model", str(tiny_chat_folder),
                             *args], capture_output=True, text=True, timeout=300)
    assert ours.returncode == 0 and engine.returncode == 0, ours.stderr
    assert ours.stdout == engine.stdout and ours.stdout.strip()
    # the whole lite path in a fresh interpreter: load, chat template, sampling with a seed, stop string, streaming
    script = f"""
import sys
from llminfer.lite import LiteModel, SamplingParams
model = LiteModel({str(exported)!r})
prompt = model.chat_prompt([{{"role": "user", "content": "hi"}}])
pieces = [o.delta for o in model.stream(prompt, SamplingParams(max_tokens=20, temperature=0.8, top_k=50, top_p=0.9,
                                                              seed=3, repetition_penalty=1.1))]
assert "".join(pieces), pieces
print("torch" in sys.modules, "onnxruntime" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]


def test_lite_seeded_sampling_and_stop_strings(tiny_chat_folder, tmp_path):
    from llminfer.lite import LiteModel

    model = LiteModel(export_onnx(str(tiny_chat_folder), tmp_path / "chat"))
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    first, again = model.generate(["hello", "hello"], params)
    assert first.token_ids == again.token_ids and len(first.token_ids) == 16
    other = model.generate("hello", SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=8, ignore_eos=True))
    assert other[0].token_ids != first.token_ids
    greedy = model.generate("hello", SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    stop = greedy.text[4:7]
    cut = model.generate("hello", SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == greedy.text[:greedy.text.index(stop)]
    streamed = "".join(o.delta for o in model.stream("hello", SamplingParams(max_tokens=16, temperature=0.0,
                                                                             ignore_eos=True, stop=[stop])))
    assert streamed == cut.text


def test_numpy_sampler_filters_like_the_engine():
    from llminfer.engine.sampler import apply_penalties as torch_penalties
    from llminfer.engine.sampler import filter_logits as torch_filter
    from llminfer.lite.sampler import apply_penalties, filter_logits

    generator = torch.Generator().manual_seed(0)
    for top_k, top_p, min_p in [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.8, 0.0), (20, 0.5, 0.05), (0, 1.0, 0.2)]:
        logits = torch.randn(100, generator=generator) * 3
        expected = torch_filter(logits[None], torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))[0]
        got = filter_logits(logits.numpy(), top_k, top_p, min_p)
        # Tokens within rounding of a top-p or min-p threshold may fall either way depending on the CPU's
        # summation order; every other token must be kept or dropped by both samplers alike.
        probs = logits.double().softmax(-1)
        mass_before = probs.sort(descending=True).values.cumsum(0) - probs.sort(descending=True).values
        mass_before = torch.empty_like(probs).scatter_(0, probs.argsort(descending=True), mass_before)
        near = ((mass_before - top_p).abs() < 1e-5) | ((probs - min_p * probs.max()).abs() < 1e-6)
        decided = ~near.numpy()
        assert np.array_equal(np.isinf(got)[decided], torch.isinf(expected).numpy()[decided])
        if top_p == 1.0 and min_p == 0.0:  # off means off: no token is dropped by rounding
            assert np.isinf(got).sum() == torch.isinf(expected).sum() == max(0, 100 - (top_k or 100))
    params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    logits = torch.randn(50, generator=generator)
    np.testing.assert_allclose(apply_penalties(logits.numpy(), params, [1, 2, 3], [3, 3, 9]),
                               torch_penalties(logits, params, [1, 2, 3], [3, 3, 9]).numpy(), rtol=1e-6)


def test_a16w8_export_matches_the_engines_a16w8_and_is_smaller(tiny_llama_folder, exported_llama, tmp_path):
    float_export = exported_llama
    int8_export = export_onnx(str(tiny_llama_folder), tmp_path / "a16w8", quantization="a16w8")
    manifest = json.loads((int8_export / "export.json").read_text())
    assert manifest["quantization"] == "a16w8"
    # the export's A16W8 is the reference ops' (dequantized weights), not our int8-activation CPU kernels
    assert lite_tokens(int8_export, PROMPTS) == engine_tokens(tiny_llama_folder, PROMPTS, quantization="a16w8",
                                                               dtype="float32", ops=reference_ops().names())
    data = [(folder / "model.onnx.data").stat().st_size for folder in (float_export, int8_export)]
    assert data[1] < 0.6 * data[0]  # int8 linears (embeddings and LM head stay float32 in this tiny model)


def test_export_refuses_unsupported_models_and_leaves_nothing_behind(tiny_llama_folder, tmp_path, monkeypatch):
    from llminfer.model.auto import AutoModel
    from llminfer.quantization import RTN, PTQConfig, save_quantized

    model = AutoModel.from_pretrained(tiny_llama_folder)
    RTN(PTQConfig.for_scheme("a16w4", group_size=32)).convert(model)
    int4 = save_quantized(model, tmp_path / "int4")
    with pytest.raises(UnsupportedModelError, match=r"is quantized as a16w4 \(rtn, group 32\); ONNX export supports "
                                                    r"float models and a16w8"):
        export_onnx(str(int4), tmp_path / "never")
    assert not (tmp_path / "never").exists()
    import llminfer.export.onnx as exporter

    def broken(*args, **kwargs):
        raise RuntimeError("export check failed: simulated")

    monkeypatch.setattr(exporter, "compare_with_pytorch", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        export_onnx(str(tiny_llama_folder), tmp_path / "failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4"]  # no destination, no partial folder


def test_cli_export_errors_are_one_line(tiny_llama_folder, tmp_path):
    from test_cli import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("export", str(tmp_path / "missing"), "-o", str(tmp_path / "x")), "missing")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert_one_line_error(run_cli("export", str(tiny_llama_folder), "-o", str(tmp_path / "busy")),
                          "already exists and is not empty")
    bad = run_cli("export", str(tiny_llama_folder), "-o", str(tmp_path / "y"), "--dtype", "bfloat16")
    assert bad.returncode == 2 and "invalid choice: 'bfloat16'" in bad.stderr
    assert_one_line_error(run_cli("export", str(tiny_llama_folder), "-o", str(tmp_path / "y"), "--opset", "17"),
                          "--opset 17 is not supported (expected 18 to 23)")
    assert not (tmp_path / "y").exists()


def test_lite_refuses_corrupt_or_mismatched_folders(tiny_llama_folder, exported_llama, tmp_path):
    from test_cli import assert_one_line_error, run_cli

    from llminfer.lite import LiteModel

    source, exported = tiny_llama_folder, exported_llama

    def copy(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(exported, folder)
        return folder

    missing = copy("missing")
    (missing / "generation_config.json").unlink()
    with pytest.raises(ModelFormatError, match="generation_config.json: listed in export.json but missing"):
        LiteModel(missing)
    truncated = copy("truncated")
    with open(truncated / "model.onnx.data", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelFormatError, match=r"model.onnx.data: 1000 bytes, export.json says \d+"):
        LiteModel(truncated)
    renamed = copy("renamed")
    manifest = json.loads((renamed / "export.json").read_text())
    manifest["inputs"][1]["name"] = "mask"
    (renamed / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="its inputs do not match export.json"):
        LiteModel(renamed)
    resized = copy("resized")  # a manifest from a model with another number of KV heads
    manifest = json.loads((resized / "export.json").read_text())
    manifest["inputs"][3]["shape"][1] = 8
    (resized / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match=r"input 'past_key_0' is float32 \['batch', 2, 'past_sequence', 16\], "
                                               r"export.json says float32 \['batch', 8, 'past_sequence', 16\]"):
        LiteModel(resized)
    garbled = copy("garbled")
    size = (garbled / "model.onnx").stat().st_size  # same size: only onnxruntime can tell
    (garbled / "model.onnx").write_bytes(b"\x00not a graph" + b"\x00" * (size - 12))
    with pytest.raises(ModelFormatError, match="onnxruntime cannot load it"):
        LiteModel(garbled)
    tampered = copy("tampered")
    data = bytearray((tampered / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (tampered / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="sha256 differs"):
        LiteModel(tampered, verify=True)
    (garbled / "export.json").write_text("{not json")
    assert_one_line_error(run_lite("generate", "--model", str(garbled), "hi"), "export.json: not valid JSON")
    assert_one_line_error(run_lite("generate", "--model", str(source), "hi"), "no export.json")
    assert_one_line_error(run_cli("generate", "--model", str(exported), "hi"), "is an ONNX export",
                          "llminfer-lite generate")


@pytest.mark.slow
def test_smollm2_export_float32_and_a16w8_match_the_engine(smollm2_llm, tmp_path_factory):
    """The real model: lite greedy tokens equal LLM.generate's for chat prompts (float32); the A16W8 export
    equals the engine's A16W8 for the first tokens and is less than half the size."""
    folder = tmp_path_factory.mktemp("smollm2-onnx")
    float_export = export_onnx("smollm2-135m", folder / "f32")
    tokenizer = smollm2_llm.tokenizer
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}])
               for text in ("What is the capital of France?", "Write a haiku about the sea.", "2 + 2 =")]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    ours = [o.token_ids for o in __import__("llminfer.lite", fromlist=["LiteModel"]).LiteModel(float_export)
            .generate(prompts, params)]
    assert ours == [o.outputs[0].token_ids for o in smollm2_llm.generate(prompts, params)]
    int8_export = export_onnx("smollm2-135m", folder / "a16w8", quantization="a16w8")
    first = SamplingParams(max_tokens=8, temperature=0.0)
    assert lite_tokens(int8_export, prompts, first) == engine_tokens("smollm2-135m", prompts, first,
                                                                     quantization="a16w8", dtype="float32",
                                                                     ops=reference_ops().names())
    sizes = [sum(p.stat().st_size for p in f.iterdir()) for f in (float_export, int8_export)]
    assert sizes[1] < 0.5 * sizes[0]


def test_lite_bench_and_engine_bench_compare_with_an_export(tiny_llama_folder, exported_llama):
    from test_cli import run_cli

    lite = run_lite("bench", "--model", str(exported_llama), "--input-len", "16", "--output-len", "8", "--iters", "1",
                    "--json")
    assert lite.returncode == 0, lite.stderr
    report = json.loads(lite.stdout)
    assert report["backend"] == "onnxruntime" and report["decode_tokens_per_s"] > 0 and report["folder_mb"] > 0
    both = run_cli("bench", "latency", "--model", str(tiny_llama_folder), "--compare-with", str(exported_llama),
                   "--input-len", "16", "--output-len", "8", "--iters", "1", "--json")
    assert both.returncode == 0, both.stderr
    report = json.loads(both.stdout)
    assert "onnxruntime" in report["results"][1]["engine"] and report["results"][1]["decode_tokens_per_s"] > 0
    assert set(report["ratio_vs_first"]) == {report["results"][1]["engine"]}
