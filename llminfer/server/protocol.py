"""OpenAI request bodies (validated, with errors that name the field) and response shapes.

Bodies are parsed by pydantic in strict mode, so `"max_tokens": "5"` is a type error as with OpenAI.
Unknown fields are accepted and ignored, as OpenAI clients send fields we do not use.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llminfer.engine.sampler import TokenLogprob
from llminfer.engine.sampling_params import SamplingParams
from llminfer.engine.structured import StructuredOutput
from llminfer.errors import InvalidSamplingParamsError

MAX_LOGPROBS = SamplingParams.MAX_LOGPROBS


class APIError(Exception):
    """Becomes an OpenAI error object with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.error_type, self.headers = error_type, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False


class JSONSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsField(_Strict):
    """vLLM's `structured_outputs` request field."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _SamplingRequest(_Strict):
    model: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's names for the other constraints: the older guided_* fields and the newer structured_outputs
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsField | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1)
    stop: Any = Field(None, validate_default=True)
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: Any) -> list[str]:
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("expected a string or a list of strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def sampling_params(self, max_tokens: int, logprobs: int | None, defaults: dict[str, Any] | None = None,
                        **extra: Any) -> SamplingParams:
        """defaults: the model's sampling defaults, for the fields this request left out (--generation-config)."""
        def chosen(name: str) -> Any:
            if defaults and name in defaults and name not in self.model_fields_set:
                return defaults[name]
            return getattr(self, name)

        return SamplingParams(
            max_tokens=max_tokens, n=self.n, temperature=chosen("temperature"), top_p=chosen("top_p"),
            top_k=chosen("top_k"), min_p=chosen("min_p"), stop=self.stop, seed=self.seed,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=chosen("repetition_penalty"), ignore_eos=self.ignore_eos, logprobs=logprobs,
            **{"structured": self.structured_output()[0], **extra})

    def structured_output(self) -> tuple[StructuredOutput | None, str | None]:
        """The one constraint the request asks for, and the field that asked (errors name it); two at once is
        a 400, never one silently winning."""
        asked: list[tuple[str, dict[str, Any]]] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            asked.append(("response_format", {"json_object": True}))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise InvalidSamplingParamsError("invalid 'response_format.json_schema': type json_schema needs "
                                                 "its schema", field="response_format.json_schema")
            asked.append(("response_format.json_schema.schema", {"json": fmt.json_schema.schema_}))
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                asked.append((name, {kind: getattr(self, name)}))
        if self.structured_outputs is not None:
            fields = self.structured_outputs
            for kind, value in (("json", fields.json_), ("regex", fields.regex), ("choice", fields.choice),
                                ("grammar", fields.grammar), ("json_object", fields.json_object or None)):
                if value is not None:
                    asked.append((f"structured_outputs.{kind}", {kind: value}))
        if not asked:
            return None, None
        if len(asked) > 1:
            raise InvalidSamplingParamsError(f"conflicting output constraints: {asked[0][0]} and {asked[1][0]}; "
                                             "send one", field=asked[1][0])
        param, spec = asked[0]
        try:
            return StructuredOutput(**spec), param
        except InvalidSamplingParamsError as exc:
            raise InvalidSamplingParamsError(invalid_field(param, exc), field=param) from None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt, generate nothing
    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Any) -> list[str | list[int]]:
        """One prompt or a batch: a string, a list of token ids, or a list of either."""
        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(value, str) or (is_ids(value) and value):
            prompts = [value]
        elif isinstance(value, list) and value and all(isinstance(p, str) or is_ids(p) for p in value):
            prompts = value
        else:
            raise ValueError("expected a string, a list of token ids, or a non-empty list of those")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("prompt is empty")
        return prompts


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers
    name: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": content or ""}
        if self.tool_calls:  # templates read the arguments as a mapping (Qwen's writes them with tojson)
            message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": _arguments(call.function.arguments)}}
                for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise APIError(400, f"invalid 'messages': tool call arguments are not valid JSON: {text[:60]!r}",
                       param="messages") from None


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition

    def as_template_input(self) -> dict[str, Any]:
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class TokenizeRequest(_Strict):
    """vLLM's /tokenize body: text, or chat messages rendered through the template first."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def parse_body(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON body; the first problem becomes a 400 naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or None
        if error["type"] == "json_invalid":
            raise APIError(400, f"request body is not valid JSON: {error['msg'].removeprefix('Invalid JSON: ')}")
        if error["type"] == "model_type":
            raise APIError(400, "request body must be a JSON object")
        if error["type"] == "missing":
            raise APIError(400, f"missing required field '{field}'", param=field)
        message = error["msg"].removeprefix("Value error, ")
        got = repr(error.get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        raise APIError(400, f"invalid '{field}': {message} (got {got})", param=field) from None


# --- responses ------------------------------------------------------------------------------------

def invalid_field(param: str, exc: Exception) -> str:
    """An engine-side message ("invalid structured output json: <why>") renamed for the request's field."""
    return f"invalid '{param}': {str(exc).split(': ', 1)[-1]}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class LogprobFormatter:
    """Token log-probabilities in the two OpenAI shapes (chat's list of objects, completions' parallel lists)."""

    def __init__(self, token_text) -> None:
        self.token_text = token_text  # token id -> its text

    def chat(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        content = [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                   for lp in logprobs]
        return {"content": content, "refusal": None}

    def _top(self, logprob: TokenLogprob) -> dict[str, float]:
        """Keyed by text, as OpenAI's legacy shape is: two tokens of the same text keep the better value."""
        top: dict[str, float] = {}
        for token_id, value in logprob.top:
            top.setdefault(self.token_text(token_id), value)
        return top

    def completion(self, logprobs: list[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
        """An echoed prompt's first token has logprob None (nothing predicts it): its top_logprobs is None."""
        tokens = [self.token_text(lp.token_id) for lp in logprobs]
        offsets = []
        for token in tokens:
            offsets.append(text_offset)
            text_offset += len(token)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [self._top(lp) if lp.logprob is not None else None for lp in logprobs],
                "text_offset": offsets}
