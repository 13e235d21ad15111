"""The OpenAI-compatible HTTP API over an `AsyncEngine`.

A request's path: auth middleware -> readiness and overload checks (before the body is even read) -> body
read with a size cap -> validation -> tokenization and chat template -> `SamplingParams` and the context check
-> `AsyncEngine.generate` -> JSON or server-sent events. A client that goes away aborts its request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from llminfer.engine.outputs import RequestOutput
from llminfer.engine.sampler import TokenLogprob
from llminfer.engine.sampling_params import SamplingParams
from llminfer.engine.structured import StructuredOutput
from llminfer.errors import InvalidPromptError, InvalidSamplingParamsError, RequestFailedError, TokenizerError
from llminfer.server.async_engine import AsyncEngine, EngineDeadError, EngineSnapshot
from llminfer.server.metrics import ServerMetrics
from llminfer.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LogprobFormatter,
    TokenizeRequest,
    invalid_field,
    new_id,
    now,
    parse_body,
    usage,
)
from llminfer.server.tools import ToolCallStream, ToolPlan, new_call_id, parse_tool_calls, plan_tool_use
from llminfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    model_name: str = "llminfer"  # what /v1/models lists and requests must name
    model_aliases: tuple[str, ...] = ()  # other names requests may use (the --model path as given)
    api_key: str | None = None
    max_queued: int = 256  # waiting engine requests (prompts x n) beyond this get 503
    max_batch_prompts: int = 256  # prompts one /v1/completions request may carry
    max_body_bytes: int = 4 * 2**20
    body_timeout_s: float = 30.0  # a body not read by then gets 408 (a client sending a byte a second)
    max_n: int = 16
    retry_after_s: int = 1


@dataclass
class ServerState:
    """What the handlers share. `engine` is None until the model has loaded."""

    config: ServerConfig
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    engine: AsyncEngine | None = None
    tokenizer: Tokenizer | None = None
    max_model_len: int = 0
    draining: bool = False
    active_http_requests: int = 0
    admitted: int = 0  # engine requests admitted but not yet handed to the engine (see _reserve)
    load_error: str | None = None
    sampling_defaults: dict[str, float | int] = field(default_factory=dict)  # for fields a request leaves out
    page_defaults: dict[str, float | int] = field(default_factory=dict)  # what the chat page starts from

    def attach(self, engine: AsyncEngine, tokenizer: Tokenizer | None,
               sampling_defaults: dict[str, float | int] | None = None) -> None:
        from llminfer.loading.sampling_defaults import cli_defaults

        self.tokenizer, self.max_model_len = tokenizer, engine.engine.max_model_len
        self.sampling_defaults = dict(sampling_defaults or {})
        self.page_defaults = cli_defaults(self.sampling_defaults)
        engine.start()
        self.engine = engine

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.is_alive and not self.draining


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="llminfer", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.openapi = lambda: _openapi(app)
    app.state.llminfer = state
    config = state.config

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    app.add_middleware(_AuthAndCount, state=state)

    @app.get("/health")
    async def health() -> Response:
        if state.ready:
            return Response(status_code=200)
        return JSONResponse({"status": _unavailable_reason(state)}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        engine = state.engine
        snapshot, waiting = (engine.snapshot, engine.num_waiting) if engine else (EngineSnapshot(), 0)
        return Response(state.metrics.render(snapshot, waiting), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": now(),
                                            "owned_by": "llminfer", "max_model_len": state.max_model_len or None,
                                            "sampling_defaults": state.page_defaults or None}]}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(_chat_page_html())

    # The tokenizer endpoints vLLM serves, in the shapes lm-evaluation-harness's remote tokenizer reads.
    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        tokenizer = _tokenizer(state)
        body = parse_body(TokenizeRequest, await _read_body(request, config))
        _check_model(body.model, config)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of 'prompt' and 'messages'", param="prompt")
        try:
            if body.messages is not None:
                ids = await asyncio.to_thread(tokenizer.apply_chat_template,
                                              [m.as_template_input() for m in body.messages],
                                              add_generation_prompt=body.add_generation_prompt, tokenize=True)
            else:
                ids = await asyncio.to_thread(tokenizer.encode, body.prompt, body.add_special_tokens)
        except TokenizerError as exc:
            raise APIError(400, f"invalid 'messages': {exc}", param="messages") from None
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids,
                "token_strs": tokenizer.convert_ids_to_tokens(ids)}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        tokenizer = _tokenizer(state)
        body = parse_body(DetokenizeRequest, await _read_body(request, config))
        _check_model(body.model, config)
        _check_token_ids(state, body.tokens, "tokens")
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        tokenizer = _tokenizer(state)
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token, "pad_token": None, "chat_template": tokenizer.chat_template,
                "model_max_length": state.max_model_len, "vocab_size": tokenizer.vocab_size}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        _admit(state)
        body = parse_body(CompletionRequest, await _read_body(request, config))
        _check_model(body.model, config)
        if len(body.prompt) > config.max_batch_prompts:
            raise APIError(400, f"invalid 'prompt': {len(body.prompt)} prompts in one request, over this server's "
                                f"limit of {config.max_batch_prompts} (--max-batch-prompts)", param="prompt")
        with _reserve(state, len(body.prompt) * body.n, "prompt") as reservation:
            return await _complete(request, body, reservation)

    async def _complete(request: Request, body: CompletionRequest, reservation: _Reservation) -> Response:
        prompts = [await asyncio.to_thread(_prompt_ids, state, p) for p in body.prompt]
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "invalid 'max_tokens': 0 generates nothing; it needs 'echo': true (to score the "
                                "prompt)", param="max_tokens")
        # echo with logprobs scores the prompt: every prompt token's logprob, as evaluation harnesses read it
        prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
        if max_tokens == 0 and prompt_logprobs is None:  # echo alone: the engine still computes the prompt
            prompt_logprobs = 0
        params = _sampling_params(state, body, prompts, max_tokens, body.logprobs, prompt_logprobs=prompt_logprobs)
        call = _Call(state, request, reservation, new_id("cmpl"), prompts, params, body.model or config.model_name,
                     echo=body.echo)
        if body.stream:
            return _sse(call.completion_chunks(body.include_usage))
        return JSONResponse(await call.collect(request, call.completion_response))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        _admit(state)
        body = parse_body(ChatCompletionRequest, await _read_body(request, config))
        _check_model(body.model, config)
        with _reserve(state, body.n, "n") as reservation:
            return await _chat(request, body, reservation)

    async def _chat(request: Request, body: ChatCompletionRequest, reservation: _Reservation) -> Response:
        if state.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so no chat template", param="messages")
        messages = [m.as_template_input() for m in body.messages]
        plan = _tool_plan(state, body, messages)
        template_variables = {"tools": plan.template_tools} if plan.template_tools else {}
        try:
            prompt = await asyncio.to_thread(state.tokenizer.apply_chat_template, plan.messages,
                                             add_generation_prompt=True, tokenize=True, **template_variables)
        except TokenizerError as exc:
            raise APIError(400, f"invalid 'messages': {exc}", param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens or max(state.max_model_len - len(prompt), 1)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "invalid 'top_logprobs': requires 'logprobs': true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        extra = {"structured": plan.grammar} if plan.grammar is not None else {}
        params = _sampling_params(state, body, [prompt], max_tokens, logprobs, **extra)
        call = _Call(state, request, reservation, new_id("chatcmpl"), [prompt], params,
                     body.model or config.model_name, tools=plan)
        if body.stream:
            return _sse(call.chat_chunks(body.include_usage))
        return JSONResponse(await call.collect(request, call.chat_response))

    return app


# Routes without the API key: the health check, and the chat page's static HTML (it holds no data; it asks the
# user for the key and sends it with every API call).
_OPEN_ROUTES = frozenset({"/health", "/"})


class _AuthAndCount:
    """Bearer-token check on every route but _OPEN_ROUTES (constant-time), a count of requests in flight for the
    SIGTERM drain, and the last resort for bugs: an OpenAI-shaped 500, logged once. Plain ASGI, so streamed
    responses and disconnects pass through untouched."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        api_key = self.state.config.api_key
        if api_key is not None and scope["path"] not in _OPEN_ROUTES:
            supplied = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(supplied, f"Bearer {api_key}".encode()):
                error = APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                return await JSONResponse(error.body(), status_code=401)(scope, receive, send)
        self.state.active_http_requests += 1
        started = False

        async def send_tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the server down
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not started:
                error = APIError(500, f"internal error: {type(exc).__name__}: {exc}", error_type="server_error")
                await JSONResponse(error.body(), status_code=500)(scope, receive, send)
        finally:
            self.state.active_http_requests -= 1
            for call in scope.get("llminfer_calls", ()):  # the exchange is over: nothing may go on running
                call.abort()


# The handlers read their bodies themselves (size cap and timeout first), so FastAPI cannot see them: the
# schema of each route's body is added here, from the same pydantic models that validate it.
_REQUEST_BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
                   "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title="llminfer", version="1", routes=app.routes,
                             description="OpenAI-compatible API (completions, chat completions) and tokenizer routes")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in _REQUEST_BODIES.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        app.openapi_schema = schema
    return app.openapi_schema


# --- admission and validation -----------------------------------------------------------------

def _unavailable_reason(state: ServerState) -> str:
    if state.load_error:
        return f"model failed to load: {state.load_error}"
    if state.engine is None:
        return "loading model"
    if state.draining:
        return "shutting down"
    return f"engine failed: {state.engine.error}" if state.engine.error else "engine stopped"


def _check_ready(state: ServerState) -> None:
    if not state.ready:
        raise APIError(503, f"service unavailable: {_unavailable_reason(state)}", error_type="server_error",
                       headers={"Retry-After": str(state.config.retry_after_s)})


def _admit(state: ServerState, count: int = 1) -> None:
    """Readiness and overload: first before the body is read (count 1), then, with the body's count of engine
    requests (prompts x n), by _reserve."""
    _check_ready(state)
    waiting, limit = state.engine.num_waiting + state.admitted, state.config.max_queued
    if waiting + count > limit:
        raise APIError(503, f"server overloaded: {waiting} requests already waiting (--max-queued {limit}); "
                            "retry later", error_type="server_error", code="overloaded",
                       headers={"Retry-After": str(state.config.retry_after_s)})


class _Reservation:
    """Engine requests admitted but not yet handed to the engine; counted against --max-queued meanwhile."""

    def __init__(self, state: ServerState, count: int) -> None:
        self.state, self.count = state, count
        state.admitted += count

    def release(self) -> None:  # once the requests are the engine's to count (or never will be)
        self.state.admitted -= self.count
        self.count = 0


@contextmanager
def _reserve(state: ServerState, count: int, param: str) -> Iterator[_Reservation]:
    """Atomic admission: the check and the count happen with no await between them, so requests that arrive
    together cannot all pass one check; the count holds through tokenization until the call submits."""
    if count > state.config.max_queued:
        raise APIError(400, f"invalid '{param}': this request makes {count} engine requests (prompts x n), more "
                            f"than this server ever queues (--max-queued {state.config.max_queued})", param=param)
    _admit(state, count)
    reservation = _Reservation(state, count)
    try:
        yield reservation
    finally:
        reservation.release()


async def _read_body(request: Request, config: ServerConfig) -> bytes:
    limit = config.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes is over the limit of {limit} bytes",
                       code="request_too_large")
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), config.body_timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"request body not received within {config.body_timeout_s:g} s "
                            f"({size} bytes arrived)", code="request_timeout") from None
    except ClientDisconnect:
        logger.info("client disconnected while sending its request body (%d bytes read)", size)
        raise APIError(499, "client closed the request") from None
    return b"".join(chunks)


def _tool_plan(state: ServerState, body: ChatCompletionRequest, messages: list[dict[str, Any]]) -> ToolPlan:
    """Check the tools (each parameter schema must compile: a call under it must be enforceable) and plan."""
    tools = [tool.as_template_input() for tool in body.tools or []]
    choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice
    grammars = state.engine.engine.grammars
    for i, tool in enumerate(tools):
        parameters = tool["function"].get("parameters")
        if parameters is not None and grammars is not None:
            try:
                grammars.compile(StructuredOutput(json=parameters))
            except InvalidSamplingParamsError as exc:
                param = f"tools.{i}.function.parameters"
                raise APIError(400, invalid_field(param, exc), param=param) from None
    try:
        plan = plan_tool_use(messages, tools, choice, body.parallel_tool_calls, state.tokenizer.chat_template)
    except ValueError as exc:
        raise APIError(400, f"invalid 'tool_choice': {exc}", param="tool_choice") from None
    if plan.grammar is not None and body.structured_output()[0] is not None:
        raise APIError(400, "invalid 'tool_choice': a forced tool call cannot also follow response_format or "
                            "another output constraint", param="tool_choice")
    return plan


def _tokenizer(state: ServerState) -> Tokenizer:
    _check_ready(state)
    if state.tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    return state.tokenizer


def _check_model(model: str | None, config: ServerConfig) -> None:
    if model is not None and model != config.model_name and model not in config.model_aliases:
        raise APIError(404, f"model '{model}' does not exist; this server serves '{config.model_name}'",
                       param="model", code="model_not_found")


def _prompt_ids(state: ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        if state.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
        return state.tokenizer.encode(prompt)
    return _check_token_ids(state, prompt, "prompt")


def _check_token_ids(state: ServerState, ids: list[int], param: str) -> list[int]:
    vocab = state.engine.engine.model.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"invalid '{param}': token id {bad[0]} is outside the vocabulary [0, {vocab})",
                       param=param)
    return ids


def _sampling_params(state: ServerState, body: Any, prompts: list[list[int]], max_tokens: int,
                     logprobs: int | None, **extra: Any) -> SamplingParams:
    if body.n > state.config.max_n:
        raise APIError(400, f"invalid 'n': {body.n} is over this server's cap of {state.config.max_n}", param="n")
    structured_param = None
    try:
        structured_param = body.structured_output()[1]
        params = body.sampling_params(max_tokens, logprobs, defaults=state.sampling_defaults, **extra)
        for ids in prompts:
            if not ids:
                raise APIError(400, "invalid 'prompt': prompt is empty (no tokens)", param="prompt")
            state.engine.engine.check_request(ids, params)
    except InvalidSamplingParamsError as exc:
        if exc.field and exc.field.startswith("structured") and structured_param:  # name the request's field
            raise APIError(400, invalid_field(structured_param, exc), param=structured_param) from None
        raise APIError(400, str(exc), param=exc.field) from None
    except InvalidPromptError as exc:
        raise APIError(400, str(exc), param="max_tokens") from None
    return params


# --- one API call: its engine requests, their outputs, the response ------------------------------

class _Call:
    """One completions or chat call: one engine request per prompt, each with n choices."""

    def __init__(self, state: ServerState, request: Request, reservation: _Reservation, call_id: str,
                 prompts: list[list[int]], params: SamplingParams, model: str, echo: bool = False,
                 tools: ToolPlan | None = None) -> None:
        self.engine, self.state, self.id, self.prompts, self.params = state.engine, state, call_id, prompts, params
        self.model, self.created, self.echo = model, now(), echo
        self.tool_names = tools.tool_names if tools is not None else set()
        self.forced_call = tools is not None and tools.grammar is not None
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        tokenizer = state.tokenizer
        self.logprobs = LogprobFormatter(
            (lambda t: tokenizer.decode([t], skip_special_tokens=False)) if tokenizer else str)
        self._submit(request, reservation)

    def _submit(self, request: Request, reservation: _Reservation) -> None:
        """Hand every engine request over now, in the same tick as the admission's release, and have the
        middleware abort them when the HTTP exchange ends (a stream whose client left before it started)."""
        self.streams = []
        request.scope.setdefault("llminfer_calls", []).append(self)
        try:
            for index, ids in enumerate(self.prompts):
                self.streams.append(self.engine.submit(self._request_id(index), ids, self.params))
        except EngineDeadError as exc:
            self.abort()
            raise _engine_error(exc) from None
        finally:
            reservation.release()

    def _request_id(self, prompt_index: int) -> str:
        return f"{self.id}-{prompt_index}"

    def abort(self) -> None:
        """Abort whatever is unfinished (a finished request ignores it)."""
        for index in range(len(self.streams)):
            self.engine.abort(self._request_id(index))

    def _choice_index(self, prompt_index: int, sample_index: int) -> int:
        return prompt_index * self.params.n + sample_index

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as the engine produces them, all prompts interleaved."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for output in self.engine.stream(self._request_id(index), self.streams[index]):
                    await queue.put((index, output))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer; cancellation is not caught
                await queue.put((index, exc))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(self.prompts))]
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:  # this request failed alone; the finally aborts its siblings
                    raise RequestFailedError(f"request failed: {item.error}")
                if self.first_token_at is None and any(c.token_ids for c in item.outputs):
                    self.first_token_at = time.monotonic()
                if item.finished:
                    remaining -= 1
                yield index, item
        finally:
            for task in tasks:  # cancelling a pump aborts its engine request
                task.cancel()

    def _record(self, finals: dict[int, RequestOutput]) -> None:
        choices = [c for out in finals.values() for c in out.outputs]
        self.state.metrics.record_finished(
            sum(map(len, self.prompts)), sum(len(c.token_ids) for c in choices),
            max(len(c.token_ids) for c in choices), [c.finish_reason for c in choices],
            self.arrival, self.first_token_at, time.monotonic())

    def _usage(self, finals: dict[int, RequestOutput]) -> dict[str, int]:
        return usage(sum(map(len, self.prompts)), sum(len(c.token_ids) for o in finals.values() for c in o.outputs))

    async def collect(self, request: Request, respond: Callable[[dict[int, RequestOutput]], dict]) -> dict:
        """Run to the end, unless the client disconnects first (then the requests are aborted)."""
        async def run() -> dict[int, RequestOutput]:
            finals = {}
            async for index, output in self.outputs():
                if output.finished:
                    finals[index] = output
            return finals

        work = asyncio.create_task(run())
        gone = asyncio.create_task(_client_gone(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
        if not work.done() or work.cancelled():
            raise APIError(499, "client closed the request")
        finals = _engine_result(work)
        self._record(finals)
        return respond(finals)

    def _echoed(self, output: RequestOutput) -> tuple[str, list | None]:
        """With echo: the prompt's text and (when logprobs were asked) its tokens' logprobs, the first None."""
        text = self.state.tokenizer.decode(output.prompt_token_ids) if self.state.tokenizer else ""
        if output.prompt_logprobs is None:
            return text, None
        return text, [lp if lp is not None else TokenLogprob(t, None, [])  # type: ignore[arg-type]
                      for t, lp in zip(output.prompt_token_ids, output.prompt_logprobs)]

    def completion_response(self, finals: dict[int, RequestOutput]) -> dict:
        choices = []
        for prompt_index in sorted(finals):
            output = finals[prompt_index]
            prompt_text, prompt_logprobs = self._echoed(output) if self.echo else ("", None)
            if self.params.logprobs is None:  # scored only because nothing is generated: not asked for
                prompt_logprobs = None
            for c in output.outputs:
                logprobs = None
                if c.logprobs is not None or prompt_logprobs is not None:
                    logprobs = self.logprobs.completion((prompt_logprobs or []) + (c.logprobs or []))
                choices.append({"index": self._choice_index(prompt_index, c.index), "text": prompt_text + c.text,
                                "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage(finals), "system_fingerprint": None}

    def chat_response(self, finals: dict[int, RequestOutput]) -> dict:
        choices = []
        for c in finals[0].outputs:
            message: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None}
            finish_reason = c.finish_reason
            if self.tool_names:
                content, calls = parse_tool_calls(c.text, self.tool_names)
                if calls:
                    message["content"] = content or None
                    message["tool_calls"] = [{"id": new_call_id(), "type": "function", "function": {
                        "name": call.name, "arguments": call.arguments}} for call in calls]
                    finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
            choices.append({"index": c.index, "message": message, "finish_reason": finish_reason,
                            "logprobs": self.logprobs.chat(c.logprobs) if c.logprobs is not None else None})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage(finals), "system_fingerprint": None}

    async def _chunks(self, include_usage: bool, object_name: str,
                      make_choice: Callable[[int, Any, list, int], dict | None],
                      first: list[dict] | None = None) -> AsyncIterator[dict]:
        """The streaming skeleton shared by chat and completions: one chunk per engine output that carries
        news, the finish reasons, and an optional usage chunk at the end."""
        base = {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "system_fingerprint": None}
        extra = {"usage": None} if include_usage else {}
        if first:
            yield {**base, "choices": first, **extra}
        sent_tokens: dict[int, int] = {}  # per choice: tokens and characters already streamed
        sent_chars: dict[int, int] = {}
        finals: dict[int, RequestOutput] = {}
        async for prompt_index, output in self.outputs():
            choices = []
            for c in output.outputs:
                index = self._choice_index(prompt_index, c.index)
                start = sent_tokens.get(index, 0)
                sent_tokens[index] = len(c.token_ids)
                new_logprobs = c.logprobs[start:] if c.logprobs is not None else None
                choice = make_choice(index, c, new_logprobs, sent_chars.get(index, 0))
                sent_chars[index] = sent_chars.get(index, 0) + len(c.delta)
                if choice is not None:
                    choices.append(choice)
            if choices:
                yield {**base, "choices": choices, **extra}
            if output.finished:
                finals[prompt_index] = output
        self._record(finals)
        if include_usage:
            yield {**base, "choices": [], "usage": self._usage(finals)}

    def completion_chunks(self, include_usage: bool) -> AsyncIterator[dict]:
        if self.echo:
            raise APIError(400, "invalid 'echo': not supported with 'stream': true; send it unstreamed",
                           param="echo")

        def choice(index: int, c: Any, new_logprobs: list | None, text_offset: int) -> dict | None:
            if not c.delta and not c.finish_reason and not new_logprobs:
                return None
            return {"index": index, "text": c.delta,
                    "logprobs": (self.logprobs.completion(new_logprobs, text_offset)
                                 if new_logprobs is not None else None),
                    "finish_reason": c.finish_reason}

        return self._chunks(include_usage, "text_completion", choice)

    def chat_chunks(self, include_usage: bool) -> AsyncIterator[dict]:
        # With tools, each choice's text goes through a ToolCallStream: content, then call deltas (arguments
        # streamed as they grow when a grammar forces the call, each call whole once it parses otherwise).
        streams = {i: ToolCallStream(self.tool_names, incremental=self.forced_call) for i in range(self.params.n)} \
            if self.tool_names else {}

        def choice(index: int, c: Any, new_logprobs: list | None, _: int) -> dict | None:
            delta: dict[str, Any] = {}
            finish_reason = c.finish_reason
            if index in streams:
                stream = streams[index]
                content, calls = stream.feed(c.delta, c.finish_reason is not None)
                if content:
                    delta["content"] = content
                if calls:
                    delta["tool_calls"] = calls
                if stream.has_calls and finish_reason == "stop":
                    finish_reason = "tool_calls"
            elif c.delta or not c.finish_reason:
                delta["content"] = c.delta
            if not delta and not finish_reason and not new_logprobs:
                return None
            return {"index": index, "delta": delta,
                    "logprobs": self.logprobs.chat(new_logprobs) if new_logprobs is not None else None,
                    "finish_reason": finish_reason}

        first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                 for i in range(self.params.n)]
        return self._chunks(include_usage, "chat.completion.chunk", choice, first)


# What the engine can report about a request: the engine's fault or this request's (500), or the client's (400).
_ENGINE_ERRORS = (EngineDeadError, RequestFailedError, InvalidPromptError, InvalidSamplingParamsError)


def _engine_error(exc: Exception) -> APIError:
    if isinstance(exc, (EngineDeadError, RequestFailedError)):
        logger.warning("%s", exc)  # a 500: the operator sees it too, once
        return APIError(500, str(exc), error_type="server_error")
    return APIError(400, str(exc), param=getattr(exc, "field", None))


def _engine_result(work: asyncio.Task) -> dict[int, RequestOutput]:
    try:
        return work.result()
    except _ENGINE_ERRORS as exc:
        raise _engine_error(exc) from None


async def _client_gone(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                # ASCII escapes: no raw U+2028 / U+0085 that line-splitting clients would cut an event at
                yield f"data: {json.dumps(chunk)}\n\n"
        except _ENGINE_ERRORS as exc:  # headers are sent: the error goes in the stream
            yield f"data: {json.dumps(_engine_error(exc).body())}\n\n"
        finally:
            await chunks.aclose()  # a client gone mid-stream: aborts the engine requests now
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _chat_page_html() -> str:
    return resources.files("llminfer.server").joinpath("static/chat.html").read_text(encoding="utf-8")
