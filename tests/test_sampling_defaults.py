"""Sampling defaults a user would expect: the model's generation config when it has one, llama.cpp's otherwise
(CLI, chat page), the model's for the fields a server request leaves out; escapes in CLI stop strings."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from llminfer.cli.main import add_sampling_arguments, sampling_params, unescape
from llminfer.cli.serve import served_name
from llminfer.errors import ConfigError
from llminfer.loading.sampling_defaults import LLAMA_CPP_DEFAULTS, from_generation_config, from_gguf_metadata
from llminfer.server.protocol import ChatCompletionRequest, CompletionRequest


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_cli_takes_the_models_defaults_else_llama_cpps_and_flags_win():
    plain = sampling_params(cli())
    assert (plain.temperature, plain.top_k, plain.top_p, plain.min_p) == (0.8, 40, 0.95, 0.05)
    assert LLAMA_CPP_DEFAULTS == {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
    model = {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1}
    params = sampling_params(cli(), model)
    assert (params.temperature, params.top_p, params.repetition_penalty, params.top_k, params.min_p) == \
        (0.6, 0.9, 1.1, 0, 0.0)  # the model's config, and nothing of llama.cpp's mixed in
    chosen = sampling_params(cli("--temperature", "1.2", "--top-k", "5"), model)
    assert (chosen.temperature, chosen.top_k, chosen.top_p) == (1.2, 5, 0.9)
    assert sampling_params(cli("--greedy"), model).is_greedy


def test_generation_config_json_and_gguf_keys_are_read_and_checked():
    assert from_generation_config({"temperature": 0.7, "top_k": 20, "top_p": 0.8, "eos_token_id": 2}, "g") == \
        {"temperature": 0.7, "top_k": 20, "top_p": 0.8}
    assert from_generation_config({"do_sample": False, "temperature": 0.7}, "g")["temperature"] == 0.0
    assert from_gguf_metadata({"general.sampling.temp": 0.5, "general.sampling.top_k": 30}, "m.gguf") == \
        {"temperature": 0.5, "top_k": 30}
    for bad in ({"temperature": "hot"}, {"top_k": 2.5}, {"top_p": float("nan")}, {"temperature": -1}):
        with pytest.raises(ConfigError, match="generation_config.json: sampling default"):
            from_generation_config(bad, "generation_config.json")


def test_a_folder_with_a_generation_config_gives_its_defaults_to_llm_and_info(tiny_chat_folder, tmp_path, capsys):
    from llminfer import LLM
    from llminfer.cli.main import main

    folder = tmp_path / "model"
    shutil.copytree(tiny_chat_folder, folder)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9, "top_k": 20}))
    assert LLM(str(folder)).sampling_defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    from llminfer.loading import open_checkpoint
    from llminfer.loading.convert import convert_checkpoint

    converted = convert_checkpoint(str(folder), tmp_path / "converted", dtype="float32")
    assert open_checkpoint(str(converted)).sampling_defaults() == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    assert main(["info", str(folder)]) == 0
    assert "sampling defaults  temperature 0.6, top_k 20, top_p 0.9 (the model's" in capsys.readouterr().out
    assert main(["info", str(tiny_chat_folder)]) == 0
    assert "temperature 0.8, top_k 40, top_p 0.95, min_p 0.05 (llama.cpp's" in capsys.readouterr().out


def test_a_server_request_takes_the_models_defaults_only_for_fields_it_leaves_out():
    defaults = {"temperature": 0.3, "top_k": 7, "repetition_penalty": 1.2}
    left_out = CompletionRequest.model_validate({"prompt": "x"}).sampling_params(4, None, defaults=defaults)
    assert (left_out.temperature, left_out.top_k, left_out.repetition_penalty, left_out.top_p) == (0.3, 7, 1.2, 1.0)
    named = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "temperature": 1.0,
                                                  "top_k": 0}).sampling_params(4, None, defaults=defaults)
    assert (named.temperature, named.top_k, named.repetition_penalty) == (1.0, 0, 1.2)
    openai = CompletionRequest.model_validate({"prompt": "x"}).sampling_params(4, None, defaults={})
    assert (openai.temperature, openai.top_k) == (1.0, 0)  # --generation-config none: OpenAI's defaults


def test_stop_string_escapes_and_the_served_model_name(tmp_path):
    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\tb\\n") == "a\tb\\n" and unescape(r"C:\path") == r"C:\path"
    assert cli("--stop", r"\n\n", "--stop", "END").stop == ["\n\n", "END"]
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert served_name(str(folder)) == "my-model" and served_name(str(folder) + "/") == "my-model"
    assert served_name("smollm2-135m") == "smollm2-135m"
