"""Tensor parallelism on CPU (gloo): N processes give the same greedy tokens as one; bad sizes are refused
before loading; a dead rank stops everything with an error naming it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llminfer import LLM, SamplingParams
from llminfer.config import ModelConfig
from llminfer.errors import ConfigError
from llminfer.parallel.sharding import ShardPlan, check_tp_size

HELPER = Path(__file__).parent / "helpers" / "tp_generate.py"
PROMPTS = [[5, 9, 200, 31, 7], list(range(10, 40)), [77] * 3]


def write_gqa_model(kv_heads: int, folder: Path) -> Path:
    """Tiny random Llama with 8 query heads and 2 or 4 KV heads (so N=4 replicates KV heads when there are 2)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=kv_heads,
                                      max_position_embeddings=128, tie_word_embeddings=kv_heads == 2,
                                      initializer_range=0.25)  # large enough weights that greedy tokens vary
    torch.manual_seed(kv_heads)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module", params=[2, 4], ids=["kv2", "kv4"])
def gqa_folder(request, tmp_path_factory):
    return write_gqa_model(request.param, tmp_path_factory.mktemp(f"tp-kv{request.param}"))


@pytest.fixture(scope="module")
def kv2_folder(tmp_path_factory):
    return write_gqa_model(2, tmp_path_factory.mktemp("tp-kv2"))


def single_process_tokens(folder, prompts=PROMPTS, quantization: str | None = None,
                          dtype: str = "auto") -> list[list[int]]:
    llm = LLM(str(folder), kv_cache_memory="8MiB", quantization=quantization, dtype=dtype)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outputs]


def torchrun(folder, n: int, prompts=PROMPTS, quantization: str = "", dtype: str = "auto") -> list[list[int]]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    from llminfer.parallel.launch import free_port

    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                             "--master-port", str(free_port()), str(HELPER), str(folder), json.dumps(prompts),
                             str(n), quantization, dtype], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[:3000]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("n", [2, 4])
def test_torchrun_greedy_equals_one_process(gqa_folder, n):
    assert torchrun(gqa_folder, n) == single_process_tokens(gqa_folder)


def test_shard_plan_splits_heads_and_replicates_kv_heads_when_fewer_than_ranks():
    from llminfer.parallel.shard import rank_skeleton

    config = ModelConfig("llama", 256, 64, 128, 2, 8, 2, 8, 128)
    ranks = [rank_skeleton(ShardPlan(config, r, 4)) for r in range(4)]  # each layer says which share it holds
    assert [m.checkpoint_split("model.layers.0.self_attn.q_proj.weight").ranges for m in ranks] == [
        ((0, 16),), ((16, 16),), ((32, 16),), ((48, 16),)]
    kv_ranges = [m.checkpoint_split("model.layers.0.self_attn.k_proj.weight").ranges for m in ranks]
    assert kv_ranges == [((0, 8),)] * 2 + [((8, 8),)] * 2
    assert ranks[1].checkpoint_split("model.layers.0.mlp.down_proj.weight").axis == 1
    assert ranks[1].checkpoint_split("model.norm.weight").axis is None
    # a checkpoint storing q|k|v fused: rank 3 takes query rows 48..64, KV head 1 of k (64 + 8) and v (80 + 8)
    assert ranks[3].checkpoint_split("model.layers.0.self_attn.qkv_proj.weight").ranges == ((48, 16), (72, 8),
                                                                                           (88, 8))
    assert ranks[1].checkpoint_split("model.layers.0.mlp.gate_up_proj.weight").ranges == ((32, 32), (160, 32))
    assert ranks[2].checkpoint_split("model.embed_tokens.weight").ranges == ((128, 64),)
    assert ranks[0].config.num_key_value_heads == 1 and ranks[0].config.num_attention_heads == 2


def test_sizes_that_do_not_divide_the_model_are_refused_with_the_valid_ones():
    smollm2 = ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, 8192)
    with pytest.raises(ConfigError, match=r"tensor parallel size 2 does not divide its 9 attention heads "
                                          r"\(valid sizes: 1, 3\)"):
        check_tp_size(smollm2, 2)
    with pytest.raises(ConfigError, match="needs 2 processes"):
        LLM("smollm2-135m", tensor_parallel_size=2)


def test_quantized_shard_plan_splits_int4_along_groups_and_replicates_channel_scales():
    from llminfer.config import QuantizationConfig
    from llminfer.parallel.shard import rank_skeleton

    config = ModelConfig("llama", 256, 64, 128, 2, 8, 2, 8, 128)
    int4 = rank_skeleton(ShardPlan(config, 1, 2, QuantizationConfig("a16w4", group_size=32)))
    assert int4.checkpoint_split("model.layers.0.self_attn.o_proj.qweight").ranges == ((16, 16),)  # 2 per byte
    assert int4.checkpoint_split("model.layers.0.self_attn.o_proj.scales").ranges == ((1, 1),)  # group 1 of 2
    assert int4.checkpoint_split("model.layers.0.mlp.down_proj.zeros").ranges == ((2, 2),)
    # fused q|k|v stored quantized: rows 32..64 of q, KV head 1 of k (64 + 8) and of v (80 + 8)
    assert int4.checkpoint_split("model.layers.0.self_attn.qkv_proj.scales").ranges == ((32, 32), (72, 8), (88, 8))
    smoothed = QuantizationConfig("a8w8", algorithm="smoothquant", smoothing=True, quantize_lm_head=True)
    int8 = rank_skeleton(ShardPlan(config, 1, 2, smoothed))
    assert int8.checkpoint_split("model.layers.0.mlp.down_proj.scales").axis is None  # one per output channel
    assert int8.checkpoint_split("model.layers.0.mlp.down_proj.smooth").ranges == ((64, 64),)
    assert int8.checkpoint_split("model.layers.0.mlp.gate_up_proj.smooth").axis is None  # every rank sees all inputs
    assert int8.checkpoint_split("lm_head.qweight").ranges == ((128, 128),)
    with pytest.raises(ConfigError, match=r"size 4 does not divide its row-parallel projections into whole int4 "
                                          r"groups of 32 \(valid sizes: 1, 2\)"):
        ShardPlan(config, 0, 4, QuantizationConfig("a16w4", group_size=32))


@pytest.fixture(scope="module", params=["a16w8", "a16w4", "a8w8"])
def quantized_folder(request, kv2_folder, tmp_path_factory):
    """The 8-head model quantized in float32 compute (so that only the split, not bf16 rounding, is tested):
    A16W8, A16W4 group 32 by GPTQ, A8W8 with SmoothQuant factors."""
    from llminfer.model.auto import AutoModel
    from llminfer.quantization import PTQConfig, quantizer_for, save_quantized

    settings = {"a16w8": {}, "a16w4": {"group_size": 32, "algorithm": "gptq"},
                "a8w8": {"algorithm": "smoothquant"}}[request.param]
    quantizer = quantizer_for(PTQConfig.for_scheme(request.param, compute_dtype="float32", **settings))
    model = AutoModel.from_pretrained(kv2_folder)
    quantizer.apply(model, calibration=[list(range(i, i + 64)) for i in range(0, 192, 64)])
    quantizer.convert(model)
    return save_quantized(model, tmp_path_factory.mktemp(f"tp-{request.param}") / "q")


def test_quantized_model_on_two_ranks_equals_one_unsharded_and_pre_sharded(quantized_folder, tmp_path):
    from llminfer.loading.hf_folder import HFFolderCheckpoint
    from llminfer.parallel.shard import ShardedCheckpoint, merge_shards, shard_checkpoint

    one = single_process_tokens(quantized_folder)
    assert torchrun(quantized_folder, 2) == one
    shard_checkpoint(str(quantized_folder), tmp_path / "tp2", 2)
    merged, original = merge_shards(tmp_path / "tp2"), dict(HFFolderCheckpoint(quantized_folder).named_tensors())
    assert merged.keys() == original.keys() and all(torch.equal(merged[k], original[k]) for k in original)
    assert ShardedCheckpoint(tmp_path / "tp2").quantization_config() == HFFolderCheckpoint(
        quantized_folder).quantization_config()
    assert torchrun(tmp_path / "tp2", 2) == one


def test_quantization_at_load_on_two_ranks_equals_one(kv2_folder):
    # int4 groups never straddle ranks, so each rank quantizes exactly the slice that one process would
    # (float32 compute: bf16 partial sums would round differently from one whole matmul)
    assert torchrun(kv2_folder, 2, quantization="a16w4", dtype="float32") == single_process_tokens(
        kv2_folder, quantization="a16w4", dtype="float32")


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return subprocess.run([sys.executable, "-m", "llminfer", *args], capture_output=True, text=True, timeout=600,
                          env=env, **kwargs)


def test_cli_tensor_parallel_generate_equals_one_process(tiny_chat_folder):
    one = run_cli("generate", "--model", str(tiny_chat_folder), "--greedy", "-n", "16", "hello world")
    two = run_cli("generate", "--model", str(tiny_chat_folder), "--greedy", "-n", "16", "--tp", "2", "hello world")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and one.stdout.strip()
    bad = run_cli("generate", "--model", str(tiny_chat_folder), "--tp", "3", "hi")
    assert bad.returncode != 0 and "tensor parallel size 3 does not divide its 4 attention heads" in bad.stderr


def test_cli_perplexity_and_bench_latency_on_two_ranks(tiny_chat_folder):
    model = str(tiny_chat_folder)
    scores = [run_cli("perplexity", "--model", model, "--max-tokens", "600", "--context-len", "128", "--json",
                      "--tp", str(n)) for n in (1, 2)]
    assert all(r.returncode == 0 for r in scores), scores[1].stderr[-2000:]
    one, two = (json.loads(r.stdout) for r in scores)
    assert two["windows"] == one["windows"] == 5 and two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    bench = run_cli("bench", "latency", "--model", model, "--input-len", "16", "--output-len", "8", "--iters", "1",
                    "--tp", "2", "--json")
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert json.loads(bench.stdout)["results"][0]["decode_tokens_per_s"] > 0
    refused = run_cli("bench", "latency", "--model", model, "--compare-with", model, "--tp", "2")
    assert refused.returncode == 2 and "run each model with --tensor-parallel-size on its own" in refused.stderr


def test_killing_a_rank_stops_every_process_with_an_error_naming_it(tmp_path):
    import transformers

    # A tiny model with a long context, generating thousands of tokens with EOS ignored: still running when killed.
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "long")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    launcher = subprocess.Popen([sys.executable, "-m", "llminfer", "bench", "latency",
                                 "--model", str(tmp_path / "long"), "--tp", "2", "--input-len", "16",
                                 "--output-len", "8000", "--iters", "1",
                                 "--kv-cache-memory", "64MiB"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    rank1 = None
    while rank1 is None and time.monotonic() < deadline:
        time.sleep(0.5)
        children = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(launcher.pid)], capture_output=True,
                                  text=True).stdout.splitlines()
        pids = [int(line.split()[0]) for line in children if "llminfer" in line]
        if len(pids) == 2:
            environ = [Path(f"/proc/{pid}/environ").read_bytes() for pid in pids]
            rank1 = next(pid for pid, e in zip(pids, environ) if b"RANK=1\x00" in e)
    assert rank1 is not None
    time.sleep(8)  # let it load and start generating
    os.kill(rank1, signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = launcher.communicate(timeout=60)
    assert time.monotonic() - killed < 10
    assert launcher.returncode != 0
    assert "tensor-parallel rank 1 of 2 failed (killed by signal 9)" in stderr
    leftovers = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher.pid)], capture_output=True, text=True)
    assert not leftovers.stdout.strip()


def test_shard_writes_one_nth_per_rank_and_merges_back_bit_for_bit(gqa_folder, tmp_path):
    from safetensors.torch import load_file

    from llminfer.parallel.shard import merge_shards, shard_checkpoint

    out = shard_checkpoint(str(gqa_folder), tmp_path / "tp2", 2)
    strategy = json.loads((out / "strategy.json").read_text())
    assert strategy["tensor_parallel_size"] == 2
    assert strategy["tensors"]["model.layers.0.self_attn.o_proj.weight"]["split"] == 1
    assert strategy["tensors"]["model.norm.weight"]["split"] == "replicated"
    original = load_file(str(gqa_folder / "model.safetensors"))
    merged = merge_shards(out)
    assert set(merged) == set(original) - ({"lm_head.weight"} if "lm_head.weight" not in merged else set())
    for name, tensor in merged.items():
        assert torch.equal(tensor, original[name]), name
    sharded_bytes = [0, 0]
    for rank in range(2):
        for name, tensor in load_file(str(out / f"rank_{rank}" / "model.safetensors")).items():
            if strategy["tensors"][name]["split"] != "replicated":
                sharded_bytes[rank] += tensor.numel() * tensor.element_size()
    total = sum(t.numel() * t.element_size() for n, t in original.items()
                if n in strategy["tensors"] and strategy["tensors"][n]["split"] != "replicated")
    assert all(abs(b - total / 2) <= 0.1 * total for b in sharded_bytes)


def test_pre_sharded_folder_gives_the_same_tokens_and_refuses_another_size(gqa_folder, tmp_path):
    from llminfer.parallel.shard import shard_checkpoint

    out = shard_checkpoint(str(gqa_folder), tmp_path / "tp2", 2)
    assert torchrun(out, 2) == single_process_tokens(gqa_folder)
    with pytest.raises(ConfigError, match="sharded for 2 ranks; run it with --tensor-parallel-size 2"):
        LLM(str(out))
    bad = run_cli("generate", "--model", str(out), "--tp", "4", "hi")
    assert bad.returncode != 0 and "sharded for 2 ranks, but running with 4" in bad.stderr


@pytest.mark.slow
def test_smollm2_on_three_ranks_equals_one(smollm2_llm, tmp_path):
    """The real model: 9 query heads and 3 KV heads over 3 ranks, from the GGUF and from a pre-sharded folder."""
    from llminfer.parallel.shard import shard_checkpoint

    prompts = [smollm2_llm.tokenizer.encode(p) for p in ("The capital of France is", "def add(a, b):")]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in smollm2_llm.generate(prompts, params)]
    assert torchrun("smollm2-135m", 3, prompts) == expected
    out = shard_checkpoint("smollm2-135m", tmp_path / "smol-tp3", 3)
    assert torchrun(out, 3, prompts) == expected


@pytest.fixture
def long_chat_folder(tiny_chat_folder, tmp_path):
    """The tiny chat model with a 16k context, so a stream can still be running when a rank is killed."""
    import shutil

    folder = tmp_path / "long-chat"
    shutil.copytree(tiny_chat_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16384}))
    return folder


def test_server_with_two_ranks_answers_like_one_and_fails_cleanly_when_a_rank_dies(long_chat_folder):
    """A rank killed while a stream is in flight: the stream ends with an error event, /health is 503 until rank 0
    exits, and every process is gone within 10 s."""
    import httpx

    from llminfer.parallel.launch import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    launcher = subprocess.Popen([sys.executable, "-m", "llminfer", "serve", "--model", str(long_chat_folder),
                                 "--tp", "2", "--port", str(port), "--kv-cache-memory", "16MiB"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        body = {"model": str(long_chat_folder), "prompt": "hello world", "max_tokens": 12, "temperature": 0}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        expected = LLM(str(long_chat_folder), kv_cache_memory="8MiB").generate(
            "hello world", SamplingParams(max_tokens=12, temperature=0.0))[0].outputs[0].text
        assert answer == expected
        events: list[str] = []

        def stream_until_it_ends() -> None:  # a request in flight when the rank dies
            long = {**body, "max_tokens": 10000, "ignore_eos": True, "stream": True, "temperature": 1.0}
            with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=60) as response:
                events.extend(line for line in response.iter_lines() if line)

        import threading

        streamer = threading.Thread(target=stream_until_it_ends)
        streamer.start()
        while not events:
            time.sleep(0.05)
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher.pid)], capture_output=True,
                                  text=True).stdout.split()
        rank1 = next(int(pid) for pid in children
                     if b"RANK=1\x00" in Path(f"/proc/{pid}/environ").read_bytes())
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        streamer.join(30)
        assert '"error"' in events[-2] and "engine failed" in events[-2]  # the in-flight request ends in an error
        health = []
        while launcher.poll() is None and time.monotonic() - killed < 10:
            try:
                health.append(httpx.get(f"{url}/health", timeout=1).status_code)
            except httpx.TransportError:
                break  # rank 0 has shut down
            time.sleep(0.1)
        assert 200 not in health  # never healthy again once a rank is gone
        _, stderr = launcher.communicate(timeout=60)
        assert time.monotonic() - killed < 10
        assert launcher.returncode != 0 and "tensor-parallel rank 1 of 2 failed" in stderr
    finally:
        if launcher.poll() is None:
            launcher.kill()
