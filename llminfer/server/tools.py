"""Tool calling for /v1/chat/completions: the prompt that offers the tools, the grammar that forces a call,
and the parser that turns generated text back into OpenAI `tool_calls`, whole or as streamed deltas.

Calls are written the way Qwen2.5/Qwen3 and Hermes-style templates teach models to write them:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A model whose template renders `tools` itself gets them through the template; any other (SmolLM2's has no
tool support) gets GENERIC_TOOL_PROMPT as a system message, and its history's calls and results are written
in the same tags. With tool_choice "required" or a named function, generation runs under a grammar built from
the tools' parameter schemas, so the arguments are always valid JSON for that schema; with "auto" the model
chooses and the parser extracts what it wrote.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from llminfer.engine.structured import JSON_OPTIONS, StructuredOutput

CALL_OPEN, CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"

GENERIC_TOOL_PROMPT = """You can call functions (tools) to help answer. The available functions, as JSON schemas:
{tools}
To call a function, reply with one block per call and nothing else:
<tool_call>
{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}
</tool_call>
Function results come back in <tool_response></tool_response> blocks. If no function is needed, answer normally."""


def template_supports_tools(template: str | None) -> bool:
    """Qwen2.5/Qwen3-style templates render the `tools` variable themselves."""
    return template is not None and "tools" in template


def call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """JSON schema of one call object: {"name": <one of the tools>, "arguments": <that tool's parameters>}."""
    options = []
    for tool in tools:
        function = tool["function"]
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                        "required": ["name", "arguments"], "additionalProperties": False})
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_OPTIONS}


def call_grammar(tools: list[dict[str, Any]], parallel: bool) -> StructuredOutput:
    """A grammar (llguidance Lark) for one call block, or several with parallel_tool_calls."""
    call = f'"<tool_call>\\n" %json {json.dumps(call_schema(tools))} "\\n</tool_call>"'
    # A newline may follow the last call: models write one after </tool_call> before they end the turn, and
    # without it that newline could only open another call.
    start = "start: call (\"\\n\" call)* \"\\n\"?" if parallel else "start: call \"\\n\"?"
    return StructuredOutput(grammar=f"{start}\ncall: {call}\n")


def tool_messages_as_text(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History for a template without tool support: assistant calls and tool results as tagged text."""
    result = []
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            blocks = [CALL_OPEN + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                             ensure_ascii=False) + CALL_CLOSE for c in message["tool_calls"]]
            content = "\n".join(([message["content"]] if message.get("content") else []) + blocks)
            result.append({"role": "assistant", "content": content})
        elif message["role"] == "tool":
            result.append({"role": "tool", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        else:
            result.append(message)
    return result


def with_generic_tool_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    prompt = GENERIC_TOOL_PROMPT.format(tools="\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools))
    messages = tool_messages_as_text(messages)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + prompt}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # the JSON text of the arguments, as generated


def parse_tool_calls(text: str, tool_names: set[str]) -> tuple[str, list[ParsedCall]]:
    """(content, calls) of a finished output, by the same rules as ToolCallStream: the content is the text
    before the first call block; each closed block that is a JSON object naming one of the tools with object
    arguments is a call. With no valid call, the whole text is content, as the model wrote it."""
    content, deltas = ToolCallStream(tool_names, incremental=False).feed(text, finished=True)
    return content, [ParsedCall(d["function"]["name"], d["function"]["arguments"]) for d in deltas]


def _parse_block(body: str, tool_names: set[str]) -> ParsedCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in tool_names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], _arguments_text(body, arguments))


def _arguments_text(body: str, arguments: dict[str, Any]) -> str:
    """The arguments as generated when they sit verbatim in the block (so a stream and a whole response
    carry the same text), else re-serialised."""
    marker = '"arguments": '
    at = body.find(marker)
    if at >= 0:
        candidate = body[at + len(marker):].rstrip().removesuffix("}").rstrip()
        try:
            if json.loads(candidate) == arguments:
                return candidate
        except ValueError:
            pass
    return json.dumps(arguments, ensure_ascii=False)


@dataclass
class _StreamedCall:
    id: str
    sent: int = 0  # characters of the arguments already sent


@dataclass
class ToolCallStream:
    """Turns a growing output into OpenAI chat deltas: content until a call block opens, then for each call a
    first delta with its id and name and then pieces of its arguments. `incremental` (a grammar guarantees the
    calls) sends arguments as they grow, holding back only what could be the block's closing; otherwise (the
    model chose freely) each call is sent whole once its block is closed and parses, so a stream never carries
    a call that a whole response would not."""

    tool_names: set[str]
    incremental: bool
    text: str = ""
    _content_sent: int = 0
    _calls: list[_StreamedCall] = field(default_factory=list)
    _blocks_done: int = 0

    def feed(self, delta: str, finished: bool) -> tuple[str, list[dict[str, Any]]]:
        """New text -> (content delta, tool-call deltas)."""
        self.text += delta
        content = self._content(finished)
        return content, self._call_deltas(finished)

    @property
    def has_calls(self) -> bool:
        return bool(self._calls)

    def _content(self, finished: bool) -> str:
        """Text before the first call block (what follows calls is not content: the calls are the answer)."""
        opener = CALL_OPEN.rstrip("\n")
        opened = self.text.find(opener)
        if finished and not self._calls and not self._pending_call():  # no call after all: all of it is content
            end = len(self.text)
        elif opened >= 0:
            end = len(self.text[:opened].rstrip())
        else:  # hold back a tail that could still become a call block's opening, or layout before it
            tail = _longest_suffix_prefix(self.text, opener)
            end = len(self.text[:len(self.text) - tail].rstrip())
        end = max(end, self._content_sent)
        piece = self.text[self._content_sent:end]
        self._content_sent = end
        return piece

    def _pending_call(self) -> bool:
        """A closed block in the text that parses as a call but has not been sent yet."""
        return any(closed and _parse_block(body, self.tool_names) is not None
                   for body, closed in self._blocks()[self._blocks_done:])

    def _blocks(self) -> list[tuple[str, bool]]:
        """(body so far, closed) of each call block in the text."""
        blocks, position = [], 0
        opener, closer = CALL_OPEN.rstrip("\n"), CALL_CLOSE.lstrip("\n")
        while True:
            start = self.text.find(opener, position)
            if start < 0:
                return blocks
            end = self.text.find(closer, start)
            body_start = start + len(opener)
            if end < 0:
                blocks.append((self.text[body_start:], False))
                return blocks
            blocks.append((self.text[body_start:end], True))
            position = end + len(closer)

    def _call_deltas(self, finished: bool) -> list[dict[str, Any]]:
        deltas = []
        for index, (body, closed) in enumerate(self._blocks()):
            if index < self._blocks_done:
                continue
            if not self.incremental:
                if closed:
                    call = _parse_block(body, self.tool_names)
                    self._blocks_done = index + 1
                    if call is not None:
                        deltas.append(self._whole(call))
                continue
            deltas.extend(self._incremental(index, body, closed))
            if closed:
                self._blocks_done = index + 1
        return deltas

    def _whole(self, call: ParsedCall) -> dict[str, Any]:
        self._calls.append(_StreamedCall(new_call_id(), len(call.arguments)))
        return {"index": len(self._calls) - 1, "id": self._calls[-1].id, "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}

    def _incremental(self, index: int, body: str, closed: bool) -> list[dict[str, Any]]:
        """The grammar writes `\\n{"name": "<name>", "arguments": <arguments>}\\n`: the name once it is closed,
        then the arguments, holding back a tail that could be the object's closing brace."""
        marker = '"arguments": '
        at = body.find(marker)
        if at < 0:
            return []
        deltas = []
        if len(self._calls) <= index:
            name = json.loads(body[:at].strip().removeprefix("{").strip().removesuffix(",").split(":", 1)[1])
            self._calls.append(_StreamedCall(new_call_id()))
            deltas.append({"index": index, "id": self._calls[index].id, "type": "function",
                           "function": {"name": name, "arguments": ""}})
        call = self._calls[index]
        arguments = body[at + len(marker):]
        if closed:
            arguments = arguments.rstrip().removesuffix("}").rstrip()
        else:
            arguments = arguments[:len(arguments) - _longest_suffix_prefix(arguments, "}" + CALL_CLOSE)]
        if len(arguments) > call.sent:
            deltas.append({"index": index, "function": {"arguments": arguments[call.sent:]}})
            call.sent = len(arguments)
        return deltas


def _longest_suffix_prefix(text: str, pattern: str) -> int:
    """Length of the longest suffix of text that is a prefix of pattern (what might still become it)."""
    for length in range(min(len(text), len(pattern)), 0, -1):
        if pattern.startswith(text[-length:]):
            return length
    return 0


@dataclass
class ToolPlan:
    """How one chat request uses its tools: what the template renders, the grammar that forces a call (if
    any), and the tool names the output is parsed for (empty: no parsing, plain content)."""

    messages: list[dict[str, Any]]
    template_tools: list[dict[str, Any]] | None  # handed to a template that renders tools itself
    grammar: StructuredOutput | None
    tool_names: set[str]


def plan_tool_use(messages: list[dict[str, Any]], tools: list[dict[str, Any]], tool_choice: str | dict | None,
                  parallel: bool, template: str | None) -> ToolPlan:
    """tool_choice: "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}} (None: auto
    with tools, none without). Raises ValueError naming what is wrong (the caller makes it a 400)."""
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice != "none" and not tools:
        raise ValueError("tool_choice needs 'tools'")
    native = template_supports_tools(template)
    if tool_choice == "none":  # the history may still hold calls and results
        return ToolPlan(messages if native else tool_messages_as_text(messages), None, None, set())
    names = [tool["function"]["name"] for tool in tools]
    if len(set(names)) != len(names):
        raise ValueError(f"two tools are named '{next(n for n in names if names.count(n) > 1)}'")
    grammar = None
    if tool_choice == "required":
        grammar = call_grammar(tools, parallel)
    elif isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        if name not in names:
            raise ValueError(f"tool_choice names function '{name}', which is not in 'tools' "
                             f"({', '.join(names)})")
        grammar = call_grammar([tools[names.index(name)]], parallel=False)
    if native:
        return ToolPlan(messages, tools, grammar, set(names))
    return ToolPlan(with_generic_tool_prompt(messages, tools), None, grammar, set(names))
