"""Tool calling's pieces without a server: the call parser, the streamed deltas (reassembled, they equal the
whole response at every split of the text), the tool plan and its refusals, and the prompts it renders."""

from __future__ import annotations

import json
import random

import pytest

from llminfer.server.tools import (
    GENERIC_TOOL_PROMPT,
    ToolCallStream,
    call_grammar,
    parse_tool_calls,
    plan_tool_use,
)
from llminfer.tokenizer.chat_template import CHATML_TEMPLATE, render_chat_template

NAMES = {"get_weather", "add"}
TWO_CALLS = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "units": {"t": "C"}}}'
             '\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2, "}"]}}\n</tool_call>')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]


def test_calls_are_parsed_and_anything_else_stays_content():
    content, calls = parse_tool_calls(TWO_CALLS, NAMES)
    assert content == "I will check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "units": {"t": "C"}}), ("add", {"a": 1, "b": [2, "}"]})]
    for text in ("no call here", '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',
                 '<tool_call>\n{"name": "add", "arguments": {"a": 1\n</tool_call>',  # cut JSON
                 '<tool_call>\n{"name": "add", "arguments": [1]}\n</tool_call>',
                 '<tool_call>\n{"name": "add", "arguments": {"a": 1}}'):  # never closed
        assert parse_tool_calls(text, NAMES) == (text, [])
    _, [call] = parse_tool_calls('<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 2}"}\n</tool_call>', NAMES)
    assert json.loads(call.arguments) == {"a": 2}


def reassemble(text: str, incremental: bool, cuts: list[int]) -> tuple[str, dict[int, dict]]:
    stream = ToolCallStream(NAMES, incremental)
    content, calls = "", {}
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    for i, piece in enumerate(pieces):
        delta, deltas = stream.feed(piece, i == len(pieces) - 1)
        content += delta
        for d in deltas:
            call = calls.setdefault(d["index"], {"name": None, "arguments": ""})
            if "id" in d:
                assert call["name"] is None and d["type"] == "function"
                call["name"] = d["function"]["name"]
            call["arguments"] += d["function"]["arguments"]
            if incremental:  # what was sent so far is always a prefix of the final arguments
                final = parse_tool_calls(text, NAMES)[1][d["index"]].arguments
                assert final.startswith(call["arguments"])
    return content, calls


@pytest.mark.parametrize("incremental", [True, False])
def test_streamed_deltas_reassemble_to_the_whole_response_at_any_split(incremental):
    rng = random.Random(7)
    expected_content, expected_calls = parse_tool_calls(TWO_CALLS, NAMES)
    for _ in range(60):
        cuts = sorted(rng.sample(range(1, len(TWO_CALLS)), rng.randint(1, 40)))
        content, calls = reassemble(TWO_CALLS, incremental, cuts)
        assert content == expected_content
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [(c.name, c.arguments) for c in expected_calls]
    content, calls = reassemble("just text <tool", incremental, [4, 11])
    assert content == "just text <tool" and not calls


def test_the_plan_forces_calls_with_a_grammar_and_refuses_bad_choices():
    messages = [{"role": "user", "content": "weather in Paris?"}]
    auto = plan_tool_use(messages, TOOLS, None, True, CHATML_TEMPLATE)
    assert auto.grammar is None and auto.tool_names == NAMES and auto.template_tools is None
    assert auto.messages[0]["role"] == "system" and "get_weather" in auto.messages[0]["content"]
    assert GENERIC_TOOL_PROMPT.split("\n")[0] in auto.messages[0]["content"]
    required = plan_tool_use(messages, TOOLS, "required", False, CHATML_TEMPLATE)
    assert required.grammar == call_grammar(TOOLS, parallel=False)
    named = plan_tool_use(messages, TOOLS, {"type": "function", "function": {"name": "add"}}, True, CHATML_TEMPLATE)
    assert named.grammar == call_grammar(TOOLS[1:], parallel=False)
    none = plan_tool_use(messages, TOOLS, "none", True, CHATML_TEMPLATE)
    assert none.tool_names == set() and none.grammar is None and none.messages == messages
    native = plan_tool_use(messages, TOOLS, "auto", True, "{% for t in tools %}{{ t.function.name }}{% endfor %}")
    assert native.template_tools == TOOLS and native.messages == messages
    for choice, tools, words in (({"type": "function", "function": {"name": "mul"}}, TOOLS, "'mul'"),
                                 ("required", [], "needs 'tools'"), ("auto", TOOLS + TOOLS[:1], "two tools")):
        with pytest.raises(ValueError, match=words):
            plan_tool_use(messages, tools, choice, True, CHATML_TEMPLATE)


def test_a_history_with_calls_and_results_renders_as_tagged_text_without_native_support():
    history = [{"role": "user", "content": "add 1 and 2"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
               {"role": "tool", "content": "3", "tool_call_id": "call_1"}]
    plan = plan_tool_use(history, TOOLS, "auto", True, CHATML_TEMPLATE)
    text = render_chat_template(CHATML_TEMPLATE, plan.messages)
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in text
    assert "<|im_start|>tool\n<tool_response>\n3\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
