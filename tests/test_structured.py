"""Structured outputs on the default model: every output of a JSON-schema request parses and validates
(jsonschema is the oracle), regex and choice outputs match, constrained rows leave unconstrained rows'
tokens alone, preemption keeps the matcher in step, and what cannot be enforced is refused up front."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace

import jsonschema
import pytest

from llminfer import EngineConfig, SamplingParams
from llminfer.engine.llm_engine import LLMEngine, exact_kv_budget
from llminfer.engine.structured import StructuredOutput, unpack_bitmask
from llminfer.errors import InvalidSamplingParamsError


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema whose every valid instance is short (strings, arrays and nesting are bounded), so a
    constrained output always completes within the test's max_tokens."""
    kinds = ["string", "integer", "number", "boolean", "enum", "pattern"] + (["object", "array", "anyOf"]
                                                                            if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 3), "maxLength": rng.randint(4, 12)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice([r"^[A-Z][a-z]{1,8}$", r"^\d{3}-\d{4}$",
                                                         r"^(red|green|blue)$", r"^[a-f0-9]{6}$"])}
    if kind == "integer":
        low = rng.randint(-100, 100)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "number":
        return {"type": "number", "minimum": rng.choice([0, -1.5, 10]), "maximum": rng.choice([20, 99.5, 1000])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["alpha", "beta", "gamma", "delta", 7, None, True], rng.randint(2, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 3)}
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1) for _ in range(2)]}
    names = rng.sample(["name", "age", "city", "tags", "score", "ok", "id", "kind", "items"], rng.randint(1, 4))
    return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
            "required": names, "additionalProperties": False}


def schemas(count: int, seed: int = 2026) -> list[dict]:
    rng = random.Random(seed)
    result = []
    while len(result) < count:
        schema = random_schema(rng)
        if schema.get("type") == "object" or rng.random() < 0.3:  # mostly objects, as APIs ask for
            result.append(schema)
    return result


@pytest.fixture(scope="module")
def engine(smollm2_llm) -> LLMEngine:
    return smollm2_llm.engine


def chat_prompt(llm, text: str) -> list[int]:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True)


def run(engine: LLMEngine, prompts, params) -> list:
    requests = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    engine.run_to_completion()
    return requests


def test_every_output_of_20_random_schemas_validates_greedy_and_sampled(smollm2_llm, engine):
    cases = schemas(20)
    prompts, params = [], []
    for i, schema in enumerate(cases):
        prompt = chat_prompt(smollm2_llm, f"Reply with JSON for this schema: {json.dumps(schema)}")
        for sampled in (False, True):
            prompts.append(prompt)
            params.append(SamplingParams(max_tokens=400, temperature=0.9 if sampled else 0, seed=i,
                                         structured=StructuredOutput(json=schema)))
    masks_before = engine.runner.masks.masks
    requests = run(engine, prompts, params)
    for request, sp in zip(requests, params):
        schema = sp.structured.json
        assert request.finish_reason == "stop", (schema, request.text)
        jsonschema.validate(json.loads(request.text), schema)  # a violation here is a bug, never allowed
    assert engine.runner.masks.masks - masks_before == sum(len(r.output_token_ids) for r in requests)


def test_regex_and_choice_outputs_match(smollm2_llm, engine):
    prompt = chat_prompt(smollm2_llm, "What is the phone number of the office?")
    regex = r"\(\d{3}\) \d{3}-\d{4}"
    choices = ["Paris", "London", "Berlin"]
    requests = run(engine, [prompt, prompt, chat_prompt(smollm2_llm, "What is the capital of France?")], [
        SamplingParams(max_tokens=40, temperature=0, structured=StructuredOutput(regex=regex)),
        SamplingParams(max_tokens=40, temperature=1.0, seed=3, structured=StructuredOutput(regex=regex)),
        SamplingParams(max_tokens=40, temperature=0, structured=StructuredOutput(choice=choices))])
    assert re.fullmatch(regex, requests[0].text) and re.fullmatch(regex, requests[1].text)
    assert requests[2].text in choices and requests[2].finish_reason == "stop"


def test_a_lark_and_a_gbnf_grammar_constrain_the_output(smollm2_llm, engine):
    prompt = chat_prompt(smollm2_llm, "Say hello.")
    lark = 'start: greeting " " name\ngreeting: "hello" | "hi"\nname: /[A-Z][a-z]{2,6}/'
    gbnf = 'root ::= ("yes" | "no") "!"'
    requests = run(engine, [prompt, prompt], [
        SamplingParams(max_tokens=20, temperature=0.7, seed=1, structured=StructuredOutput(grammar=lark)),
        SamplingParams(max_tokens=20, temperature=0, structured=StructuredOutput(grammar=gbnf))])
    assert re.fullmatch(r"(hello|hi) [A-Z][a-z]{2,6}", requests[0].text), requests[0].text
    assert requests[1].text in ("yes!", "no!")


def test_constrained_rows_leave_the_unconstrained_rows_of_their_batch_alone(smollm2_llm, engine):
    prompts = [chat_prompt(smollm2_llm, q) for q in ("Name a color.", "Count to five.", "Tell me a joke.")]
    free = [SamplingParams(max_tokens=24, temperature=0), SamplingParams(max_tokens=24, temperature=0.8, seed=9)]
    alone = [r.output_token_ids for r in run(engine, prompts[:2], free)]
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}}, "required": ["color"]}
    constrained = [SamplingParams(max_tokens=24, temperature=0, structured=StructuredOutput(json=schema))] * 2
    mixed = run(engine, [prompts[2], prompts[0], prompts[2], prompts[1]],
                [constrained[0], free[0], constrained[1], free[1]])
    assert [mixed[1].output_token_ids, mixed[3].output_token_ids] == alone
    for request in (mixed[0], mixed[2]):
        jsonschema.validate(json.loads(request.text), schema)


def test_preempted_structured_requests_resume_in_step_with_their_grammar(smollm2_llm):
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string",
              "maxLength": 8}, "minItems": 3, "maxItems": 3}}, "required": ["items"], "additionalProperties": False}
    prompts = [chat_prompt(smollm2_llm, f"List three {thing} as JSON.") for thing in ("fruits", "animals", "tools",
                                                                                       "colors")]
    params = SamplingParams(max_tokens=60, temperature=0, structured=StructuredOutput(json=schema))
    model, tokenizer = smollm2_llm.model, smollm2_llm.tokenizer
    roomy = LLMEngine(model, tokenizer, EngineConfig(enable_prefix_caching=False))
    expected = [r.output_token_ids for r in run(roomy, prompts, [params] * 4)]
    longest = max(len(p) for p in prompts) + 60
    tight = exact_kv_budget(EngineConfig(block_size=16, max_num_batched_tokens=64), model, longest, 2)
    tight = replace(tight, max_num_seqs=4)
    engine = LLMEngine(model, tokenizer, tight)
    requests = run(engine, prompts, [params] * 4)
    assert engine.scheduler.num_preemptions > 0
    assert [r.output_token_ids for r in requests] == expected
    for request in requests:
        jsonschema.validate(json.loads(request.text), schema)


def test_n_samples_each_follow_the_grammar_and_max_tokens_cuts_with_length(smollm2_llm, engine):
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["answer"], "additionalProperties": False}
    prompt = chat_prompt(smollm2_llm, "What is 6 times 7? Answer in JSON.")
    engine.add_request(prompt, SamplingParams(max_tokens=30, n=3, temperature=1.0, seed=5,
                                              structured=StructuredOutput(json=schema)), request_id="three")
    [output] = [o for o in engine.run_to_completion() if o.request_id == "three"]
    assert len(output.outputs) == 3
    for sample in output.outputs:
        assert sample.finish_reason == "stop"
        jsonschema.validate(json.loads(sample.text), schema)
    [full, cut] = run(engine, [prompt, prompt], [
        SamplingParams(max_tokens=30, temperature=0, structured=StructuredOutput(json=schema)),
        SamplingParams(max_tokens=3, temperature=0, structured=StructuredOutput(json=schema))])
    jsonschema.validate(json.loads(full.text), schema)
    assert cut.finish_reason == "length" and cut.output_token_ids == full.output_token_ids[:3]
    assert full.text.startswith(cut.text) and cut.text != full.text  # the text is what was generated


@pytest.mark.parametrize("spec, field, words", [
    (StructuredOutput(json={"type": "strin"}), "structured.json", "strin"),
    (StructuredOutput(json={"type": "object", "if": {"required": ["a"]}}), "structured.json", "if"),
    (StructuredOutput(json={"type": "string", "format": "not-a-format"}), "structured.json", "not-a-format"),
    (StructuredOutput(regex="a(b"), "structured.regex", "unclosed group"),
    (StructuredOutput(json={"properties": 5}), "structured.json", "properties must be an object"),
    (StructuredOutput(json={"type": "integer", "minimum": "x"}), "structured.json", "minimum"),
    (StructuredOutput(json={"$ref": "#/$defs/missing"}), "structured.json", "/$defs/missing"),
    (StructuredOutput(grammar='start: ( "a"'), "structured.grammar", "Expected token ')'"),
    (StructuredOutput(grammar='root ::= "a" undefined_rule'), "structured.grammar", "undefined_rule"),
])
def test_what_cannot_be_enforced_is_refused_at_submission_naming_it(engine, spec, field, words):
    queued = len(engine.scheduler.waiting)
    with pytest.raises(InvalidSamplingParamsError, match=re.escape(words)) as caught:
        engine.add_request([1, 2, 3], SamplingParams(structured=spec))
    assert caught.value.field == field and "\n" not in str(caught.value)
    assert len(engine.scheduler.waiting) == queued  # nothing was queued


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"), ({"json": "{not json"}, "not valid JSON"),
    ({"json": [1]}, "schema object"), ({"choice": []}, "non-empty list"), ({"choice": ["a", ""]}, "non-empty strings"),
    ({"regex": 5}, "non-empty string"),
])
def test_malformed_constraints_are_refused_on_construction(kwargs, message):
    with pytest.raises(InvalidSamplingParamsError, match=message):
        StructuredOutput(**kwargs)


def test_bitmask_unpacking_is_bit_b_of_word_w_for_token_32w_plus_b():
    import torch

    words = torch.tensor([[1 - 2**31, 0b101], [0, -1]], dtype=torch.int32)  # bit 31: the sign bit
    allowed = unpack_bitmask(words, 40)
    assert allowed[0].nonzero()[:, 0].tolist() == [0, 31, 32, 34]
    assert allowed[1].nonzero()[:, 0].tolist() == list(range(32, 40))
