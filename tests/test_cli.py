"""The `llminfer` command as a user runs it: output, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llminfer import SamplingParams


def run_cli(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llminfer.cli.main", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.slow
def test_generate_prints_the_greedy_continuation(smollm2_llm):
    expected = smollm2_llm.generate("The capital of France is", SamplingParams(max_tokens=16, temperature=0))[0].text
    result = run_cli("generate", "--greedy", "-n", "16", "The capital of France is")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "Paris" in result.stdout


@pytest.mark.slow
def test_chat_answers_each_line_until_end_of_input():
    result = run_cli("chat", "--greedy", "-n", "24", stdin="What is the capital of France?\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_info_describes_the_architecture(tiny_llama_folder):
    result = run_cli("info", str(tiny_llama_folder))
    assert result.returncode == 0, result.stderr
    assert "architecture       llama" in result.stdout
    assert "attention heads    4 (key/value heads: 2, head dim 16)" in result.stdout


def test_convert_then_generate_from_the_converted_folder(tiny_llama_folder, tmp_path):
    result = run_cli("convert", str(tiny_llama_folder), "-o", str(tmp_path / "out"), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["source_format"] == "hf-safetensors"
    info = run_cli("info", str(tmp_path / "out"))
    assert "format             llminfer" in info.stdout
    files = [f for f in (tmp_path / "out").iterdir() if f.is_file()]
    assert f": {len(files)} files, " in result.stdout  # every file it wrote, manifest included


@pytest.mark.parametrize("args,fragments", [
    (["generate", "--model", "/no/such/model", "hi"], ["/no/such/model", "no such file"]),
    (["generate", "--temperature", "-1", "hi"], ["temperature=-1.0", ">= 0"]),
    (["generate", "--top-p", "1.5", "hi"], ["top_p=1.5", "(0, 1]"]),
    (["generate", "--max-new-tokens", "0", "hi"], ["max_tokens=0", ">= 1"]),
    (["info", "no-such-alias"], ["no-such-alias", "not found"]),
    # the default model splits by 3: said once, by the launcher, before any rank starts
    (["generate", "--tp", "2", "hi"], ["tensor parallel size 2 does not divide", "valid sizes: 1, 3"]),
])
def test_bad_arguments_give_one_line_and_exit_2(args, fragments):
    assert_one_line_error(run_cli(*args), *fragments)


def test_truncated_safetensors_is_named(tiny_llama_folder, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_llama_folder / "config.json").read_text())
    data = (tiny_llama_folder / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_cli("generate", "--model", str(broken), "hi"), "model.safetensors")


def test_corrupt_gguf_is_named(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    assert_one_line_error(run_cli("info", str(bad)), "bad.gguf", "not a valid GGUF")


def test_truncated_gguf_is_named(tmp_path):
    from conftest import make_hf_model
    from gguf import GGMLQuantizationType
    from test_gguf import write_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(make_hf_model("llama"), path, GGMLQuantizationType.Q8_0)
    path.write_bytes(path.read_bytes()[:-5000])
    assert_one_line_error(run_cli("generate", "--model", str(path), "hi"), "tiny.gguf")


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert_one_line_error(run_cli("info", str(tmp_path)), "GPT2LMHeadModel", "not supported")


def test_config_missing_fields_is_named(tiny_llama_folder, tmp_path):
    config = json.loads((tiny_llama_folder / "config.json").read_text())
    del config["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((tiny_llama_folder / "model.safetensors").read_bytes())
    assert_one_line_error(run_cli("info", str(tmp_path)), "config.json", "hidden_size")


def test_prompt_longer_than_context_is_refused():
    result = run_cli("generate", "--max-model-len", "8", "--greedy",
                     "a prompt that is certainly longer than eight tokens once it is tokenized")
    assert_one_line_error(result, "prompt has", "max_model_len")


def test_debug_flag_shows_the_traceback():
    result = run_cli("--debug", "generate", "--model", "/no/such/model", "hi")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_bench_latency_reports_both_engines_as_json(tiny_llama_folder):
    result = run_cli("bench", "latency", "--model", str(tiny_llama_folder), "--input-len", "40", "--output-len", "4",
                     "--iters", "1", "--compare", "hf", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["engine"] for r in report["results"]] == ["llminfer", "transformers"]
    for r in report["results"]:
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["ttft_ms"] > 0
    assert set(report["ratio_vs_transformers"]) == {"prefill", "decode", "ttft"}
    assert report["prefix_cache_hit_tokens"] == 0  # repeated prompts are prefilled, not looked up


def test_threads_reach_torch_and_the_bench_report(tiny_llama_folder):
    result = run_cli("bench", "latency", "--model", str(tiny_llama_folder), "--input-len", "8", "--output-len", "2",
                     "--iters", "1", "--threads", "1", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["threads"] == 1
    assert_one_line_error(run_cli("generate", "--threads", "0", "hi"), "--threads", "0")


def test_compare_llama_cpp_refuses_before_loading_what_it_cannot_run(tiny_llama_folder, smollm2_gguf):
    """llama.cpp runs GGUF files only; without llama-cpp-python (not in the test install) it says how to get it."""
    import importlib.util

    assert_one_line_error(run_cli("bench", "latency", "--model", str(tiny_llama_folder), "--compare", "llama.cpp"),
                          "--compare llama.cpp runs a GGUF file", "safetensors")
    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama-cpp-python is installed here")
    assert_one_line_error(run_cli("bench", "latency", "--model", str(smollm2_gguf), "--compare", "llama.cpp"),
                          "needs llama-cpp-python", "pip install -e '.[bench]'")


def test_bench_throughput_reports_kv_use_and_prefix_hits(tiny_llama_folder):
    result = run_cli("bench", "throughput", "--model", str(tiny_llama_folder), "--num-prompts", "6", "--input-len",
                     "8", "--prefix-len", "32", "--output-len", "4", "--kv-cache-memory", "1MiB", "--compare", "hf",
                     "--hf-batch-size", "3", "--hf-dtype", "bfloat16", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["engine"] for r in report["results"]] == ["llminfer", "transformers"]
    assert report["dtype"] == "float32" and report["hf_dtype"] == "bfloat16"  # each engine its own configuration
    assert report["prompt_tokens"] == 6 * 40
    assert report["prefix_cache_hit_rate"] == pytest.approx(5 * 32 / 240)  # all but the first prompt hit
    assert report["prefill_tokens_computed"] == 240 - 5 * 32
    assert 0 < report["kv_blocks_peak"] <= report["kv_blocks_total"]


def test_bench_throughput_profiles_the_widest_pure_decode_steps(tiny_llama_folder, capsys):
    """--profile times each phase of the steady-state steps: they add up to the step, and the widest batch is
    the one reported (4 requests decoding together; prefill and mixed steps are left out)."""
    from llminfer.cli.main import main

    code = main(["bench", "throughput", "--model", str(tiny_llama_folder), "--num-prompts", "4", "--input-len", "8",
                 "--output-len", "6", "--max-num-batched-tokens", "64", "--profile", "--json"])
    report = json.loads(capsys.readouterr().out)
    profile = report["step_profile"]
    assert code == 0 and report["max_num_batched_tokens"] == 64
    assert profile["batch_size"] == 4 and profile["steps"] >= 3
    ms = profile["ms"]
    assert all(ms[phase] > 0 for phase in ("schedule", "prepare inputs", "forward + logits", "sampler"))
    assert ms["other"] >= 0 and sum(v for k, v in ms.items() if k != "step") == pytest.approx(ms["step"])
    assert profile["outside_forward_share"] == pytest.approx(1 - ms["forward + logits"] / ms["step"])


def test_bench_throughput_runs_the_workload_again_under_a_json_schema(tiny_chat_folder, tmp_path, capsys):
    from llminfer.cli.main import main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"tag": {"enum": ["a", "b"]}}, "required": ["tag"],
                                  "additionalProperties": False}))
    code = main(["bench", "throughput", "--model", str(tiny_chat_folder), "--num-prompts", "3", "--input-len", "8",
                 "--output-len", "40", "--structured-json", str(schema), "--json"])
    report = json.loads(capsys.readouterr().out)
    structured = report["structured"]
    assert code == 0 and [r["engine"] for r in report["results"]] == ["llminfer", "llminfer (JSON schema)"]
    # {"tag": "a"} is a handful of tokens: every constrained request stops long before its 40
    assert 3 <= structured["output_tokens"] < 3 * 40 and report["output_tokens"] == 3 * 40
    assert structured["mask_ms_per_token"] > 0 and structured["mask_wait_ms_per_step"] >= 0
    assert structured["ratio_vs_unconstrained"] == pytest.approx(
        report["results"][1]["output_tokens_per_s"] / report["results"][0]["output_tokens_per_s"])


def test_the_synthetic_chat_workload_is_fixed_seed_and_spans_its_length_ranges():
    from llminfer.cli.bench import CHAT_OUTPUT_LENGTHS, CHAT_PROMPT_LENGTHS, synthetic_prompts, workload

    chat = workload("synthetic-chat", 300, 128, 128, 0, 49152)
    assert chat == workload("synthetic-chat", 300, 128, 128, 0, 49152)  # the same requests every run
    prompt_lengths, output_lengths = [len(p) for p, _ in chat], [n for _, n in chat]
    for lengths, (low, high) in [(prompt_lengths, CHAT_PROMPT_LENGTHS), (output_lengths, CHAT_OUTPUT_LENGTHS)]:
        assert low <= min(lengths) < 2 * low and high / 2 < max(lengths) <= high
        assert sorted(lengths)[len(lengths) // 2] < (low + high) / 2  # log-uniform: most requests are short
    assert all(100 <= t < 49152 - 100 for p, _ in chat for t in p)
    fixed = workload("fixed", 5, 12, 7, 3, 49152)
    assert fixed == [(p, 7) for p in synthetic_prompts(5, 12, 3, 49152)]


def test_bench_throughput_on_the_synthetic_chat_workload_reports_latency_percentiles(tiny_llama_folder, capsys,
                                                                                     monkeypatch):
    from llminfer.cli import bench
    from llminfer.cli.main import main

    monkeypatch.setattr(bench, "CHAT_PROMPT_LENGTHS", (4, 64))  # the tiny model holds 256 positions
    monkeypatch.setattr(bench, "CHAT_OUTPUT_LENGTHS", (2, 24))
    code = main(["bench", "throughput", "--model", str(tiny_llama_folder), "--dataset", "synthetic-chat",
                 "--num-prompts", "12", "--max-num-seqs", "4", "--json"])
    report = json.loads(capsys.readouterr().out)
    requests = bench.workload("synthetic-chat", 12, 128, 128, 0, 320)
    assert code == 0 and report["dataset"] == "synthetic-chat"
    assert report["output_tokens"] == sum(n for _, n in requests)
    assert report["prompt_tokens"] == sum(len(p) for p, _ in requests)
    assert 0 < report["ttft_s"]["p50"] <= report["ttft_s"]["p90"] <= report["ttft_s"]["p99"]
    assert 0 < report["tpot_s"]["p50"] <= report["tpot_s"]["p99"]


def test_bench_throughput_prints_the_perplexity_delta_of_its_configuration(tiny_chat_folder, tiny_llama_folder,
                                                                          capsys):
    from llminfer import LLM
    from llminfer.cli.main import main
    from llminfer.perplexity import default_text, perplexity

    code = main(["bench", "throughput", "--model", str(tiny_chat_folder), "--quantization", "a16w8",
                 "--num-prompts", "2", "--input-len", "4", "--output-len", "2", "--perplexity", "--json"])
    report = json.loads(capsys.readouterr().out)["perplexity"]
    assert code == 0 and report["context_len"] == 255  # the tiny model's 256 positions
    reference = LLM(str(tiny_chat_folder), dtype="float32", kv_cache_memory="64MiB")
    ids = reference.tokenizer.encode(default_text(), add_special_tokens=False)[:report["tokens"]]
    assert report["tokens"] == 8192
    assert report["float32"] == pytest.approx(perplexity(reference.model, ids, 255).perplexity, rel=1e-9)
    assert report["delta"] == pytest.approx(report["ours"] / report["float32"] - 1) and report["delta"] != 0
    assert main(["bench", "throughput", "--model", str(tiny_llama_folder), "--perplexity"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading line: one line
    assert error.startswith("llminfer: error:")
    assert error.endswith("has no tokenizer, so --perplexity has no text to score")


def test_bad_kv_cache_memory_is_named():
    assert_one_line_error(run_cli("generate", "--kv-cache-memory", "lots", "hi"), "kv_cache_memory 'lots'")


@pytest.mark.parametrize("argv, module, install", [
    (["export", "smollm2-135m", "-o", "unused"], "onnxscript", "pip install 'llminfer[export]'"),
])
def test_a_missing_optional_package_is_one_line_saying_what_to_install(monkeypatch, capsys, argv, module, install):
    import importlib.util

    from llminfer.cli.main import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and module in error and install in error


def test_lite_without_onnxruntime_says_what_to_install(monkeypatch, capsys, tmp_path):
    import importlib.util

    from llminfer.cli.lite import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert main(["generate", "--model", str(tmp_path), "hi"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "onnxruntime" in error and "pip install onnxruntime" in error


def test_ctrl_c_stops_the_reply_and_keeps_what_was_generated(capsys):
    from llminfer.cli.commands import _stream
    from llminfer.engine.outputs import CompletionOutput, RequestOutput

    closed = []

    class Interrupted:
        def stream(self, prompt, params):
            try:
                for piece in ("Paris ", "is "):
                    yield RequestOutput("0", None, [], [CompletionOutput(0, piece, [], None, piece)], False)
                raise KeyboardInterrupt
            finally:
                closed.append(True)

    assert _stream(Interrupted(), "q", None, interruptible=True) == "Paris is "
    assert closed and capsys.readouterr().out == "Paris is  [stopped]\n"
    with pytest.raises(KeyboardInterrupt):  # generate: Ctrl-C still ends the program
        _stream(Interrupted(), "q", None)
