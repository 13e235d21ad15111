"""Decoding over the KV cache must give what recomputing the whole sequence gives."""

from __future__ import annotations

import torch

from conftest import prefill_logits

from llminfer import AutoModel, EngineConfig, SamplingParams
from llminfer.engine.llm_engine import LLMEngine
from llminfer.engine.scheduler import ScheduledBatch


def full_recompute_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits of the last position with a fresh cache, all tokens in one prefill."""
    return prefill_logits(model, [ids])[0]


def test_decode_steps_match_full_recompute(tiny_hf):
    _, _, folder = tiny_hf
    model = AutoModel.from_pretrained(folder)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8], list(range(30, 50))]
    engine = LLMEngine(model, None, EngineConfig())
    requests = [engine.add_request(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)) for p in prompts]
    engine._admit_pending()
    engine.runner.compute_logits(engine.scheduler.schedule())  # prefill all three
    generator = torch.Generator().manual_seed(0)
    for step in range(12):
        for r in requests:  # feed arbitrary tokens: the cache must not care where they came from
            r.output_token_ids.append(int(torch.randint(0, model.config.vocab_size, (1,), generator=generator)))
        batch = ScheduledBatch(requests, [1] * len(requests))
        decoded = engine.runner.compute_logits(batch)
        for row, r in enumerate(requests):
            expected = full_recompute_logits(model, r.all_token_ids)
            torch.testing.assert_close(decoded[row], expected, atol=1e-4, rtol=0, msg=f"step {step} request {row}")


def test_continuing_a_prompt_in_chunks_matches_one_prefill(tiny_llama_folder):
    model = AutoModel.from_pretrained(tiny_llama_folder)
    ids = list(range(10, 40))
    engine = LLMEngine(model, None, EngineConfig())
    request = engine.add_request(ids, SamplingParams(max_tokens=1))
    engine._admit_pending()
    request.cache_slot = engine.cache.allocate_slot()
    engine.runner.compute_logits(ScheduledBatch([request], [20]))  # first 20 tokens
    chunked = engine.runner.compute_logits(ScheduledBatch([request], [10]))  # the remaining 10
    torch.testing.assert_close(chunked[0], full_recompute_logits(model, ids), atol=1e-4, rtol=0)


def test_finished_requests_free_their_slot_for_waiting_ones(tiny_llama_folder):
    model = AutoModel.from_pretrained(tiny_llama_folder)
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=2))
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (2, 9, 4, 3)]
    requests = [engine.add_request([5, 6, 7], p) for p in params]
    outputs = {o.request_id: o for o in engine.run_to_completion()}
    assert [len(outputs[r.request_id].token_ids) for r in requests] == [2, 9, 4, 3]
    assert engine.cache.num_free_slots == engine.cache.num_slots == 2
    # Batched results equal each request run alone.
    for r, p in zip(requests, params):
        alone = LLMEngine(model, None, EngineConfig())
        solo = alone.add_request([5, 6, 7], p)
        alone.run_to_completion()
        assert solo.output_token_ids == r.output_token_ids


def test_requests_added_while_others_run_are_served_when_a_slot_frees(tiny_llama_folder):
    model = AutoModel.from_pretrained(tiny_llama_folder)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine = LLMEngine(model, None, EngineConfig())
    first = engine.add_request([5, 6, 7], params)
    engine.step()  # cache sized for one request
    late = engine.add_request([8, 9], params)
    outputs = {o.request_id: o for o in engine.run_to_completion()}
    assert first.is_finished and late.is_finished
    for request, prompt in ((first, [5, 6, 7]), (late, [8, 9])):
        alone = LLMEngine(model, None, EngineConfig())
        solo = alone.add_request(prompt, params)
        alone.run_to_completion()
        assert solo.output_token_ids == request.output_token_ids
    assert late.request_id in outputs
