"""`convert`: HF folders and GGUF files into our format, which then loads to the same logits."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import prefill_logits
from safetensors.torch import load_file

from llminfer import AutoModel, SamplingParams
from llminfer.errors import ConfigError, ModelFormatError
from llminfer.loading import open_checkpoint
from llminfer.loading.convert import convert_checkpoint

PROMPT = [5, 17, 42, 99, 3, 250, 7]


def last_logits(model) -> torch.Tensor:
    return prefill_logits(model, [PROMPT])[0]


def test_converted_folder_loads_to_the_same_logits(tiny_hf, tmp_path):
    variant, _, folder = tiny_hf
    out = convert_checkpoint(str(folder), tmp_path / "converted", dtype="float32")
    original, converted = AutoModel.from_pretrained(folder), AutoModel.from_pretrained(out)
    assert open_checkpoint(str(out)).format == "llminfer"
    assert converted.config == original.config
    torch.testing.assert_close(last_logits(converted), last_logits(original), atol=0, rtol=0, msg=variant)


def test_converted_folder_has_manifest_shards_and_loads_in_transformers(tiny_llama_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    out = convert_checkpoint(str(tiny_llama_folder), tmp_path / "c", dtype="bfloat16", max_shard_bytes=40_000)
    manifest = json.loads((out / "manifest.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert set(shards) <= set(manifest["files"]) and manifest["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for s in shards for t in load_file(out / s).values())
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # our config.json is HF-compatible
    ours = AutoModel.from_pretrained(out)
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPT])).logits[0, -1]
    torch.testing.assert_close(last_logits(ours), expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_smollm2_gguf_converts_with_tokenizer_and_generates_the_same(tmp_path, smollm2_llm):
    from llminfer import LLM

    out = convert_checkpoint("smollm2-135m", tmp_path / "smol", dtype="float32")
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    converted = LLM(str(out))
    params = SamplingParams(max_tokens=12, temperature=0)
    assert converted.generate("Once upon a time", params)[0].token_ids == \
        smollm2_llm.generate("Once upon a time", params)[0].token_ids
    assert converted.tokenizer.chat_template == smollm2_llm.tokenizer.chat_template


def test_failed_conversion_leaves_nothing_behind(tiny_llama_folder, tmp_path, monkeypatch):
    import llminfer.loading.convert as convert_module

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(convert_module, "write_manifest", explode)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(str(tiny_llama_folder), tmp_path / "out", dtype="float32")
    assert os.listdir(tmp_path) == []


def test_refuses_to_overwrite_a_non_empty_destination(tiny_llama_folder, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not empty"):
        convert_checkpoint(str(tiny_llama_folder), tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_truncated_converted_shard_is_detected(tiny_llama_folder, tmp_path):
    out = convert_checkpoint(str(tiny_llama_folder), tmp_path / "c", dtype="float32")
    shard = out / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelFormatError, match="truncated"):
        open_checkpoint(str(out))
