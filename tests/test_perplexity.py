"""Perplexity through the engine's paged prefill equals transformers' loss on the same windows."""

from __future__ import annotations

import math

import pytest
import torch

from llminfer.model.auto import AutoModel
from llminfer.perplexity import default_text, perplexity


def transformers_perplexity(hf_model, ids: list[int], context_len: int) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), context_len):
            window = ids[start:start + context_len]
            if len(window) < 2:
                continue
            logits = hf_model(torch.tensor([window])).logits[0, :-1].double()
            targets = torch.tensor(window[1:])
            nll -= float(logits.log_softmax(-1).gather(1, targets[:, None]).sum())
            count += len(window) - 1
    return math.exp(nll / count)


def test_tiny_model_perplexity_matches_transformers(tiny_hf):
    name, hf_model, folder = tiny_hf
    ids = torch.randint(0, 320, (203,), generator=torch.Generator().manual_seed(0)).tolist()
    model = AutoModel.from_pretrained(folder)
    for context_len in (64, 100):  # windows that end mid-block and a ragged last window
        ours = perplexity(model, ids, context_len)
        assert ours.tokens_scored == sum(len(ids[i:i + context_len]) - 1 for i in range(0, len(ids), context_len))
        assert ours.perplexity == pytest.approx(transformers_perplexity(hf_model, ids, context_len), rel=1e-5)


@pytest.mark.slow
def test_smollm2_perplexity_on_the_default_text_matches_transformers(smollm2_hf, smollm2_llm):
    _, hf_model = smollm2_hf
    ids = smollm2_llm.tokenizer.encode(default_text(), add_special_tokens=False)[:1024]
    ours = perplexity(smollm2_llm.model, ids, 512)
    assert ours.windows == 2 and ours.tokens_scored == 1022
    assert ours.perplexity == pytest.approx(transformers_perplexity(hf_model, ids, 512), rel=1e-4)
    assert 5 < ours.perplexity < 50  # a real model on real English text


def test_perplexity_cli_errors_are_one_line(tmp_path, tiny_chat_folder):
    from test_cli import assert_one_line_error, run_cli

    result = run_cli("perplexity", "--model", str(tiny_chat_folder), "--text-file", str(tmp_path / "missing.txt"))
    assert_one_line_error(result, "missing.txt", "not found")
    text = tmp_path / "one.txt"
    text.write_text("a")
    result = run_cli("perplexity", "--model", str(tiny_chat_folder), "--text-file", str(text), "--context-len", "64")
    assert_one_line_error(result, "nothing to score")
    result = run_cli("perplexity", "--model", str(tiny_chat_folder), "--context-len", "256")
    assert_one_line_error(result, "--context-len 256 does not fit the model's context of 256 tokens",
                          "--context-len 255 or less")
    ok = run_cli("perplexity", "--model", str(tiny_chat_folder), "--max-tokens", "300", "--context-len", "128",
                 "--json")
    assert ok.returncode == 0, ok.stderr
    import json

    report = json.loads(ok.stdout)
    assert report["windows"] == 3 and report["tokens_scored"] == 297 and report["perplexity"] > 1
