"""Sampling on hand-made distributions, penalties by formula, parameter validation, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from llminfer import LLM, SamplingParams
from llminfer.engine.sampler import Sampler, SamplingInput, apply_penalties, draw, filter_logits
from llminfer.errors import InvalidSamplingParamsError

PROBS = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
LOGITS = PROBS.log()


def kept(top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> set[int]:
    out = filter_logits(LOGITS[None], torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))[0]
    return {i for i in range(len(PROBS)) if out[i] > float("-inf")}


@pytest.mark.parametrize("top_k,expected", [(1, {0}), (2, {0, 1}), (4, {0, 1, 2, 3}), (0, {0, 1, 2, 3, 4})])
def test_top_k_keeps_the_k_most_likely(top_k, expected):
    assert kept(top_k=top_k) == expected


@pytest.mark.parametrize("top_p,expected", [
    (0.5, {0}),  # 0.5 alone reaches the nucleus mass
    (0.51, {0, 1}),
    (0.7, {0, 1}),
    (0.71, {0, 1, 2}),
    (0.99, {0, 1, 2, 3, 4}),
    (0.01, {0}),  # the best token always survives
])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    assert kept(top_p=top_p) == expected


@pytest.mark.parametrize("min_p,expected",
                         [(0.3, {0, 1, 2}), (0.41, {0}), (0.19, {0, 1, 2, 3}), (0.0, {0, 1, 2, 3, 4})])
def test_min_p_drops_tokens_below_fraction_of_the_best(min_p, expected):
    assert kept(min_p=min_p) == expected  # thresholds: 0.15, 0.205, 0.095


def test_filters_combine_as_intersection():
    assert kept(top_k=3, top_p=0.6, min_p=0.0) == {0, 1}
    assert kept(top_k=4, top_p=0.9, min_p=0.25) == {0, 1, 2}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    params = SamplingParams(repetition_penalty=2.0)
    out = apply_penalties(logits, params, prompt_ids=[0], output_ids=[1])
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = torch.zeros(4)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, params, prompt_ids=[3, 3], output_ids=[0, 0, 2])
    # prompt tokens are not penalised; count(0)=2, count(2)=1
    assert out.tolist() == [-(0.25 * 2 + 0.5), 0.0, -(0.25 + 0.5), 0.0]


def test_sampling_frequencies_follow_the_distribution():
    sampler = Sampler()
    params = SamplingParams(temperature=1.0)
    generator = torch.Generator().manual_seed(0)
    rows = [SamplingInput(params, [], [], generator)]
    counts = torch.zeros(5)
    for _ in range(4000):
        counts[sampler(LOGITS[None], rows).token_ids[0]] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, PROBS, atol=0.03), freq


def test_temperature_sharpens_the_distribution():
    sampler = Sampler()
    generator = torch.Generator().manual_seed(0)
    rows = [SamplingInput(SamplingParams(temperature=0.25), [], [], generator)]
    draws = [sampler(LOGITS[None], rows).token_ids[0] for _ in range(2000)]
    # p ∝ p^4: token 0 gets 0.5^4 / sum(p^4) ≈ 0.93
    expected = 0.5**4 / float((PROBS**4).sum())
    assert math.isclose(draws.count(0) / len(draws), expected, abs_tol=0.03)


def test_logprobs_are_the_raw_distribution_with_top_alternatives():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    rows = [SamplingInput(SamplingParams(temperature=0, logprobs=5), [], [], None),
            SamplingInput(SamplingParams(temperature=0), [], [], None),
            SamplingInput(SamplingParams(temperature=0.7, logprobs=0, repetition_penalty=1.3), [1, 2], [3], None)]
    out = Sampler()(logits, rows)
    oracle = logits.double().log_softmax(dim=-1)
    assert out.logprobs[1] is None
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0] == int(oracle[0].argmax())
    assert math.isclose(first.logprob, float(oracle[0].max()), abs_tol=1e-5)
    expected_top = oracle[0].topk(5)
    assert [t for t, _ in first.top] == expected_top.indices.tolist()
    assert all(math.isclose(v, float(e), abs_tol=1e-5) for (_, v), e in zip(first.top, expected_top.values))
    third = out.logprobs[2]  # reported before penalties and temperature
    assert third.top == [] and math.isclose(third.logprob, float(oracle[2, out.token_ids[2]]), abs_tol=1e-5)


def sample_one_row(logits: torch.Tensor, row: SamplingInput) -> int:
    """The sampler, one row at a time and without batching tricks: the reference the batched sampler must
    equal token for token."""
    params = row.params
    if params.has_penalties:
        logits = apply_penalties(logits, params, row.prompt_token_ids, row.output_token_ids)
    if params.is_greedy:
        return int(logits.argmax())
    scaled = (logits / params.temperature).clamp(-torch.finfo(torch.float32).max, torch.finfo(torch.float32).max)
    if params.top_k > 0 or params.top_p < 1 or params.min_p > 0:
        scaled = filter_logits(scaled[None], torch.tensor([max(params.top_k, 0)]), torch.tensor([params.top_p]),
                               torch.tensor([params.min_p]))[0]
    uniform = torch.rand(1, generator=row.generator)
    return int(draw(scaled.softmax(dim=-1)[None], uniform)[0])


def random_row(rng: torch.Generator, vocab: int, seed: int) -> SamplingInput:
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    params = SamplingParams(
        temperature=pick([0.0, 0.5, 1.0, 1.7]), top_k=pick([0, 0, 1, 5, 40, 300]), top_p=pick([1.0, 0.9, 0.5]),
        min_p=pick([0.0, 0.0, 0.05]), repetition_penalty=pick([1.0, 1.0, 1.3, 0.8]),
        presence_penalty=pick([0.0, 0.0, 0.5, -0.3]), frequency_penalty=pick([0.0, 0.0, 0.25, 1.5]))
    history = torch.randint(vocab, (2, int(torch.randint(12, (1,), generator=rng))), generator=rng).tolist()
    return SamplingInput(params, history[0], history[1], torch.Generator().manual_seed(seed))


def test_batched_sampler_equals_the_row_by_row_sampler_on_random_batches():
    """Same seeds, same tokens: penalties, temperature, top-k (both the topk and the sort path, mixed in one
    batch), top-p, min-p and the draw, over 40 random batches of 3 steps each."""
    rng = torch.Generator().manual_seed(7)
    vocab, sampler, compared = 500, Sampler(), 0
    for batch_index in range(40):
        batch = int(torch.randint(1, 24, (1,), generator=rng))
        rows = [random_row(rng, vocab, seed=1000 * batch_index + i) for i in range(batch)]
        twins = [SamplingInput(r.params, r.prompt_token_ids, list(r.output_token_ids),
                               torch.Generator().manual_seed(r.generator.initial_seed())) for r in rows]
        for _ in range(3):
            logits = torch.randn(batch, vocab, generator=rng) * 3
            got = sampler(logits, rows).token_ids
            expected = [sample_one_row(logits[i], twin) for i, twin in enumerate(twins)]
            assert got == expected, (batch_index, [r.params for r in rows])
            for row, twin, token in zip(rows, twins, got):
                row.output_token_ids.append(token)
                twin.output_token_ids.append(token)
            compared += batch
    assert compared > 600


def test_draw_is_the_inverse_cdf_of_the_probabilities():
    """Against a float64 walk along the cumulative probabilities; probability-0 tokens are never drawn."""
    rng = torch.Generator().manual_seed(3)
    probs = torch.rand(6, 1000, generator=rng) ** 8
    probs[:, ::3] = 0.0
    probs /= probs.sum(dim=-1, keepdim=True)
    uniforms = torch.rand(6, generator=rng)
    uniforms[0], uniforms[1] = 0.0, 1.0 - 2**-24  # the ends of [0, 1)
    got = draw(probs, uniforms).tolist()
    cdf = torch.cat([torch.zeros(6, 1, dtype=torch.float64), probs.double().cumsum(dim=-1)], dim=-1)
    for row, token in enumerate(got):
        target = float(uniforms[row]) * float(cdf[row, -1])
        assert probs[row, token] > 0
        # token owns [cdf[token], cdf[token + 1]) of the float64 walk, up to float32's rounding of the sums
        assert float(cdf[row, token]) - 1e-6 <= target < float(cdf[row, token + 1]) + 1e-6, (row, token)
    assert got[0] == 1  # u = 0: the first token with probability (token 0 has none)


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0), ("top_k", -2),
    ("min_p", 1.5), ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("stop", [""]),
    ("temperature", float("inf")), ("temperature", float("nan")), ("logprobs", 21), ("logprobs", -1),
])
def test_invalid_sampling_values_are_rejected_with_the_field_name(field, value):
    with pytest.raises(InvalidSamplingParamsError, match=field):
        SamplingParams(**{field: value})


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama_folder):
    return LLM(str(tiny_llama_folder))


def test_top_k_1_equals_greedy(tiny_llm):
    prompt = [[4, 8, 15, 16, 23, 42]]
    greedy = tiny_llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    top1 = tiny_llm.generate(prompt, SamplingParams(max_tokens=24, temperature=1.3, top_k=1, seed=5,
                                                    ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids


def test_same_seed_gives_same_tokens_and_other_seeds_differ(tiny_llm):
    prompt = [[4, 8, 15, 16, 23, 42]]

    def sample(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=24, temperature=1.0, seed=seed, ignore_eos=True)
        return tiny_llm.generate(prompt, params)[0].token_ids

    assert sample(7) == sample(7)
    assert len({tuple(sample(s)) for s in range(4)}) > 1


def test_seeded_request_is_unaffected_by_its_batch_neighbours(tiny_llm):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=11, ignore_eos=True)
    alone = tiny_llm.generate([[1, 2, 3]], params)[0].token_ids
    batched = tiny_llm.generate([[9, 9, 9], [1, 2, 3], [5, 5]], params)[1].token_ids
    assert alone == batched


def test_generate_reports_one_logprob_per_token_matching_a_full_recompute(tiny_llm):
    from conftest import prefill_logits

    prompt = [4, 8, 15, 16, 23, 42]
    plain = tiny_llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    out = tiny_llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2))[0]
    assert out.token_ids == plain.token_ids and plain.outputs[0].logprobs is None
    logprobs = out.outputs[0].logprobs
    assert [lp.token_id for lp in logprobs] == out.token_ids
    prefixes = [prompt + out.token_ids[:i] for i in range(len(out.token_ids))]
    oracle = prefill_logits(tiny_llm.model, prefixes).double().log_softmax(dim=-1)
    for row, lp in zip(oracle, logprobs):
        assert math.isclose(lp.logprob, float(row[lp.token_id]), abs_tol=1e-4)
        assert [t for t, _ in lp.top] == row.topk(2).indices.tolist()
