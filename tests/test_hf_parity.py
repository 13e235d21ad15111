"""Our network against Hugging Face transformers on tiny random Llama / Mistral / Qwen2 models."""

from __future__ import annotations

import torch
from conftest import make_hf_model, prefill_logits

from llminfer import LLM, AutoModel, SamplingParams, generate

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12, 13], list(range(20, 60))]


def hf_last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def test_last_position_logits_match_transformers(tiny_hf):
    variant, hf_model, folder = tiny_hf
    ours = AutoModel.from_pretrained(folder)
    logits = prefill_logits(ours, PROMPTS)
    for row, ids in enumerate(PROMPTS):
        expected = hf_last_logits(hf_model, ids)
        torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=0, msg=f"{variant}: prompt {row}")


def test_sliding_window_is_read_and_changes_long_prompts(tmp_path):
    from dataclasses import replace

    from llminfer.model.auto import build_model

    make_hf_model("mistral").save_pretrained(tmp_path)
    windowed = AutoModel.from_pretrained(tmp_path)
    assert windowed.config.sliding_window == 12
    unwindowed = build_model(replace(windowed.config, sliding_window=None))
    unwindowed.load_state_dict(windowed.state_dict())
    long_prompt = PROMPTS[2]

    assert not torch.allclose(prefill_logits(windowed, [long_prompt]), prefill_logits(unwindowed, [long_prompt]),
                              atol=1e-3)


def test_greedy_tokens_match_transformers_for_32_steps(tiny_hf):
    variant, hf_model, folder = tiny_hf
    llm = LLM(str(folder))
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for ids, output in zip(PROMPTS, outputs):
        with torch.no_grad():
            expected = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                         eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert output.token_ids == expected, variant
        assert output.finish_reason == "length"


def test_model_style_generate_returns_prompt_plus_new_ids(tiny_llama_folder):
    model = AutoModel.from_pretrained(tiny_llama_folder)
    ids = torch.tensor([PROMPTS[0]])
    out = generate(model, ids, max_new_tokens=8)
    assert out.shape == (1, len(PROMPTS[0]) + 8)
    assert out[0, : len(PROMPTS[0])].tolist() == PROMPTS[0]
    sampled = generate(model, ids, max_new_tokens=8, do_sample=True, top_k=3, seed=1)
    assert sampled.shape == out.shape
    assert torch.equal(sampled, generate(model, ids, max_new_tokens=8, do_sample=True, top_k=3, seed=1))
