"""The OpenAI-compatible server, live on 127.0.0.1: the official `openai` client, concurrency, validation,
auth, overload, disconnects, engine failure, metrics. The oracle for outputs is `LLM.generate` on a second copy
of the same model."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import httpx
import jsonschema
import openai
import pytest
import uvicorn

from llminfer import LLM, SamplingParams
from llminfer.server import AsyncEngine, ServerConfig, ServerState, create_app
from llminfer.server.connections import uvicorn_config

MODEL = "tiny"


def wait_healthy(process, url: str, timeout: float = 300.0) -> None:
    """Wait for a `llminfer serve` subprocess to log that it is ready (its own signal, not a guess of how long
    loading takes; the bound only catches a hang), then check /health. Its output keeps being drained by a
    thread, so a chatty server can never block on a full pipe."""
    ready = threading.Event()
    lines: list[str] = []

    def drain() -> None:
        for line in process.stdout:
            lines.append(line)
            if "ready: serving" in line:
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.2):
        assert process.poll() is None, "server exited before it was ready:\n" + "".join(lines)
        assert time.monotonic() < deadline, "server never became ready:\n" + "".join(lines)
    while True:  # ready means loaded; the socket may still be a moment behind
        try:
            if httpx.get(f"{url}/health", timeout=60).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "server never answered /health"
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """The app on a real socket, served by uvicorn in a thread of the test process."""

    def __init__(self, llm: LLM, uvicorn_options: dict | None = None, **config) -> None:
        self.state = ServerState(ServerConfig(model_name=MODEL, **config))
        self.state.attach(AsyncEngine(llm.engine), llm.tokenizer)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the transport `llminfer serve` runs (protocol, keep-alive), so the tests meet its races too
        self.server = uvicorn.Server(uvicorn_config(create_app(self.state), "127.0.0.1", self.port,
                                                    **(uvicorn_options or {})))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.state.engine.stop()

    def metric(self, name: str, headers: dict | None = None) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=headers).text
        values = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
        assert values, f"{name} not in /metrics"
        return float(values[0])


@pytest.fixture(scope="module")
def oracle(tiny_chat_folder) -> LLM:
    return LLM(str(tiny_chat_folder))


@pytest.fixture(scope="module")
def server(tiny_chat_folder):
    live = LiveServer(LLM(str(tiny_chat_folder)))
    yield live
    live.close()


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


GREEDY = SamplingParams(max_tokens=12, temperature=0)


def test_completion_matches_llm_generate_and_has_the_openai_shape(client, oracle):
    expected = oracle.generate(["The for statement"], GREEDY)[0]
    response = client.completions.create(model=MODEL, prompt="The for statement", max_tokens=12, temperature=0)
    assert response.object == "text_completion" and response.id.startswith("cmpl-") and response.created > 0
    assert response.choices[0].text == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_chat_applies_the_template_and_streams_the_same_text(client, oracle):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a class?"}]
    expected = oracle.chat(messages, GREEDY)[0]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == len(oracle.chat_prompt(messages))
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_completion_ends_with_done(server):
    body = {"model": MODEL, "prompt": "Lists", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_n_choices_batch_prompts_and_logprobs(client, oracle):
    response = client.completions.create(model=MODEL, prompt=["Tuples", "Sets are"], max_tokens=6,
                                         temperature=0.8, seed=3, n=2, logprobs=3)
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    for choice in response.choices:
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs)
        # keyed by token text, as OpenAI's shape is: distinct tokens with the same text share a key
        assert all(1 <= len(top) <= 3 for top in choice.logprobs.top_logprobs)
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    expected = oracle.generate(["Tuples"], SamplingParams(max_tokens=6, temperature=0))[0]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in content)
    # greedy: the chosen token is the most likely one
    assert all(e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in content)
    assert expected.token_ids  # the oracle ran


def test_32_concurrent_streams_complete_with_correct_usage(server, oracle):
    prompts = [f"Item {i}: the import statement" + " and" * (i % 7) for i in range(32)]
    expected = oracle.generate(prompts, SamplingParams(max_tokens=16, temperature=0))

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, object]:
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
            usage = chunk.usage or usage
        return text, usage

    async def run_all():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(run_all())
    for (text, usage), want in zip(results, expected):
        assert text == want.text
        assert usage.prompt_tokens == len(want.prompt_token_ids)
        assert usage.completion_tokens == len(want.token_ids)


def test_requests_arriving_in_a_burst_join_one_step(tiny_chat_folder, oracle):
    """A wave of arrivals a few milliseconds apart is gathered into the first step instead of trickling into
    several small ones (the gaps here are wide so that a loaded machine keeps them under the window)."""
    llm = LLM(str(tiny_chat_folder))
    engine = AsyncEngine(llm.engine, arrival_gap_s=0.2, gather_s=5.0)
    batch_sizes = []
    step = llm.engine.step

    def counting_step():
        outputs = step()
        batch_sizes.append(len(llm.engine.scheduler.running) + sum(o.finished for o in outputs))
        return outputs

    llm.engine.step = counting_step
    prompts = [f"Burst {i}: the import statement" for i in range(8)]
    expected = oracle.generate(prompts, GREEDY)

    async def burst():
        streams = []
        for i, prompt in enumerate(prompts):
            ids = llm.tokenizer.encode(prompt)
            streams.append((f"burst-{i}", engine.submit(f"burst-{i}", ids, GREEDY)))
            await asyncio.sleep(0.01)
        texts = []
        for request_id, stream in streams:
            last = None
            async for last in engine.stream(request_id, stream):
                pass
            texts.append(llm.tokenizer.decode(last.token_ids))
        return texts

    async def run():
        engine.start()
        try:
            return await burst()
        finally:
            engine.stop()

    texts = asyncio.run(run())
    assert batch_sizes[0] == len(prompts), batch_sizes
    assert texts == [want.text for want in expected]


def test_models_health_metrics_and_chat_page(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert httpx.get(f"{server.url}/health").status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ["llminfer_num_requests_running", "llminfer_num_requests_waiting", "llminfer_kv_cache_usage_ratio",
                 "llminfer_prefix_cache_hit_ratio", "llminfer_prompt_tokens_total",
                 "llminfer_generation_tokens_total", "llminfer_request_success_total",
                 "llminfer_time_to_first_token_seconds_bucket", "llminfer_time_per_output_token_seconds_bucket",
                 "llminfer_e2e_request_latency_seconds_bucket"]:
        assert name in metrics, name
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "<textarea" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: no external resources


def _post(server, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json"}, **kwargs)


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]

VALIDATION_CASES = [
    # (path, body, status, the field the message must name)
    (CHAT, b"{not json", 400, "JSON"),
    (CHAT, b"[1, 2]", 400, "JSON object"),
    (CHAT, {"model": MODEL}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    (COMPLETIONS, {"model": MODEL}, 400, "prompt"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt"),
    (COMPLETIONS, {"prompt": 42}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [1, 99999]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": MSGS, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 1000}, 400, "256"),  # over the context: both numbers
    (COMPLETIONS, {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    (COMPLETIONS, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    (COMPLETIONS, b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    (COMPLETIONS, b'{"prompt": "x", "temperature": Infinity}', 400, "temperature"),
    (COMPLETIONS, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    (COMPLETIONS, {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    (COMPLETIONS, {"prompt": "x", "n": 0}, 400, "n"),
    (COMPLETIONS, {"prompt": "x", "n": 17}, 400, "n"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    (CHAT, {"messages": MSGS, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (COMPLETIONS, {"prompt": "x", "stop": ""}, 400, "stop"),
    (COMPLETIONS, {"prompt": "x", "stop": ["ok", ""]}, 400, "stop"),
    (COMPLETIONS, {"prompt": "x", "stop": 5}, 400, "stop"),
    (COMPLETIONS, {"prompt": "x", "seed": 1.5}, 400, "seed"),
    (COMPLETIONS, {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    (COMPLETIONS, {"prompt": "x", "stream": "yes"}, 400, "stream"),
    (COMPLETIONS, {"prompt": "x", "model": "gpt-4"}, 404, "gpt-4"),
    (CHAT, {"messages": MSGS, "model": "other"}, 404, "other"),
    # structured outputs: what cannot be enforced, or does not parse, is refused naming the field
    (CHAT, {"messages": MSGS, "response_format": {"type": "xml"}}, 400, "response_format.type"),
    (CHAT, {"messages": MSGS, "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema"),
    (CHAT, {"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "if": {"required": ["a"]}}}}}, 400,
     "'response_format.json_schema.schema': Unimplemented keys: [\"if\"]"),
    (CHAT, {"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strin"}}}}, 400, "Invalid type: strin"),
    (COMPLETIONS, {"prompt": "x", "guided_regex": "a(b"}, 400, "'guided_regex': "),
    (COMPLETIONS, {"prompt": "x", "guided_grammar": 'root ::= "a" missing'}, 400, "missing"),
    (COMPLETIONS, {"prompt": "x", "guided_choice": []}, 400, "guided_choice"),
    (COMPLETIONS, {"prompt": "x", "structured_outputs": {"regex": "[a-"}}, 400, "structured_outputs.regex"),
    (COMPLETIONS, {"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}, 400, "conflicting"),
    (COMPLETIONS, {"prompt": "x", "echo": True, "stream": True}, 400, "echo"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0, "echo": True, "n": 2}, 400, "n"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": MSGS}, 400, "prompt"),
    ("/detokenize", {"tokens": [1, 99999]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
]


@pytest.mark.parametrize("path,body,status,field", VALIDATION_CASES)
def test_bad_requests_get_the_openai_error_object_naming_the_field(server, path, body, status, field):
    response = _post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert field in error["message"], error["message"]
    assert "\n" not in error["message"]


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                          "role": {"enum": ["admin", "user"]}},
          "required": ["name", "age", "role"], "additionalProperties": False}


def test_response_format_json_schema_strict_is_valid_json_streamed_or_not(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for temperature in (0, 1.0):
        response = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=60, seed=4,
                                                  temperature=temperature, response_format=response_format)
        choice = response.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        stream = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=60, seed=4,
                                                temperature=temperature, response_format=response_format,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == choice.message.content
    anything = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=40, temperature=0,
                                              response_format={"type": "json_object"}).choices[0]
    if anything.finish_reason == "stop":  # a random model may fill max_tokens inside an open object
        assert isinstance(json.loads(anything.message.content), dict)
    else:
        assert anything.finish_reason == "length" and anything.message.content.startswith("{")


def test_vllm_constraint_fields_on_both_endpoints(client):
    choice = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=10, temperature=0.9, seed=1,
                                       extra_body={"guided_choice": ["red", "green", "blue"]}).choices[0]
    assert choice.text in ("red", "green", "blue") and choice.finish_reason == "stop"
    regex = r"[0-9]{2}-[a-z]{3}"
    for extra in ({"guided_regex": regex}, {"structured_outputs": {"regex": regex}}):
        text = client.completions.create(model=MODEL, prompt="Code:", max_tokens=12, temperature=0,
                                         extra_body=extra).choices[0].text
        assert re.fullmatch(regex, text), text
    grammar = 'root ::= "yes" | "no"'
    chat = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=5, temperature=0,
                                          extra_body={"guided_grammar": grammar}).choices[0]
    assert chat.message.content in ("yes", "no")


def test_echo_with_logprobs_scores_the_prompt_as_a_full_recompute(server, tiny_chat_folder):
    import torch
    from transformers import AutoModelForCausalLM

    text = "Lists are mutable sequences, typically used to store collections"
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "add_special_tokens": True}).json()["tokens"]
    hf = AutoModelForCausalLM.from_pretrained(tiny_chat_folder, torch_dtype=torch.float32)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    for prompt, max_tokens in ((text, 0), (ids, 0), (text, 1)):
        body = _post(server, COMPLETIONS, {"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": max_tokens,
                                           "temperature": 0}).json()
        choice = body["choices"][0]
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(ids) + max_tokens
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        got = torch.tensor(logprobs["token_logprobs"][1:len(ids)], dtype=torch.float64)
        want = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for position, top in enumerate(logprobs["top_logprobs"][1:len(ids)]):
            assert max(top.values()) == pytest.approx(float(expected[position].max()), rel=1e-4)
        assert choice["text"].startswith(text) and body["usage"]["completion_tokens"] == max_tokens
        assert choice["finish_reason"] == "length"


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 12},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def long_context_client(tiny_chat_folder, tmp_path_factory):
    """The tiny chat model with a 2048-token context: tool prompts (the tools' schemas in the tiny
    vocabulary) do not fit in its 256."""
    import shutil

    folder = tmp_path_factory.mktemp("tiny-chat-2048") / "model"
    shutil.copytree(tiny_chat_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    live = LiveServer(LLM(str(folder)))
    yield openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    live.close()


def streamed_tool_calls(stream) -> tuple[str, list[tuple[str, str]], str]:
    """(content, [(name, arguments)], finish_reason) reassembled from chat chunks, as an OpenAI client does."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                if delta.id:
                    assert call["id"] is None and delta.id.startswith("call_")
                    call["id"] = delta.id
                call["name"] += (delta.function.name or "") if delta.function else ""
                call["arguments"] += (delta.function.arguments or "") if delta.function else ""
            finish = choice.finish_reason or finish
    return content, [(c["name"], c["arguments"]) for _, c in sorted(calls.items())], finish


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls_have_valid_arguments_streamed_or_not(long_context_client, tool_choice):
    client = long_context_client
    tools = [WEATHER, ADD]
    for temperature in (0, 1.0):
        # one call: the random model never picks EOS, so with parallel calls it writes them until max_tokens
        kwargs = dict(model=MODEL, messages=ASK, tools=tools, tool_choice=tool_choice, max_tokens=120, seed=11,
                      temperature=temperature, parallel_tool_calls=False)
        choice = client.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
        assert calls and all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
        if isinstance(tool_choice, dict):
            assert [name for name, _ in calls] == ["add"]
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        for name, arguments in calls:
            jsonschema.validate(json.loads(arguments), schemas[name])
        content, streamed, finish = streamed_tool_calls(client.chat.completions.create(**kwargs, stream=True))
        assert (content, streamed, finish) == ("", calls, "tool_calls")


def test_auto_tool_choice_extracts_the_call_the_model_writes(long_context_client):
    client = long_context_client
    # The tiny random model would not choose a tool by itself: a regex makes it write one, so the parser is
    # tested on text that really came out of the engine.
    written = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER, ADD], max_tokens=200, temperature=0,
                  extra_body={"guided_regex": re.escape(written)})
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris",
                                                                                         "unit": "celsius"})
    _, streamed, finish = streamed_tool_calls(client.chat.completions.create(**kwargs, stream=True))
    assert streamed == [(call.function.name, call.function.arguments)] and finish == "tool_calls"
    plain = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=8, temperature=0,
                                           extra_body={"guided_regex": "Sunny, [0-9]{2} degrees"}).choices[0]
    assert plain.message.tool_calls is None and plain.message.content.startswith("Sunny")
    called = {"id": call.id, "type": "function",
              "function": {"name": "get_weather", "arguments": call.function.arguments}}
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [called]},
                     {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none",
                                            max_tokens=6, temperature=0).choices[0]
    assert answer.message.tool_calls is None and answer.finish_reason == "length"


@pytest.mark.parametrize("body, field", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "add"}}}, "'add'"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER, WEATHER]}, "two tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "get_weather", "arguments": "{not json"}}]}]}, "arguments are not valid JSON"),
])
def test_bad_tool_requests_are_a_400_naming_the_field(long_context_client, body, field):
    response = httpx.post(f"{long_context_client.base_url}chat/completions", json={"messages": ASK, **body})
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["message"]


def test_tokenizer_endpoints_in_the_shapes_lm_eval_reads(server, oracle):
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": "test words", "add_special_tokens": False}).json()
    assert tokens["tokens"] == oracle.tokenizer.encode("test words", add_special_tokens=False)
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 256
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": MSGS}).json()["tokens"]
    assert chat == oracle.tokenizer.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=True)
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back == {"prompt": "test words"}
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == oracle.tokenizer.eos_token and info["chat_template"] == oracle.tokenizer.chat_template


def test_prompt_over_the_context_names_both_numbers(server):
    error = _post(server, COMPLETIONS, {"prompt": "x", "max_tokens": 1000}).json()["error"]
    assert "1000" in error["message"] and "256" in error["message"]


def test_oversized_body_is_413_and_server_keeps_serving(tiny_chat_folder):
    live = LiveServer(LLM(str(tiny_chat_folder)), max_body_bytes=2000)
    try:
        big = {"prompt": "x" * 5000, "max_tokens": 1}
        assert _post(live, COMPLETIONS, big).status_code == 413
        # chunked upload without a content-length is cut off too
        chunked = httpx.post(f"{live.url}{COMPLETIONS}", content=iter([json.dumps(big).encode()]),
                             headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        assert _post(live, COMPLETIONS, {"prompt": "x", "max_tokens": 1}).status_code == 200
    finally:
        live.close()


def test_api_key_guards_every_route_but_health_and_the_page(tiny_chat_folder):
    live = LiveServer(LLM(str(tiny_chat_folder)), api_key="s3cret")
    try:
        good = {"Authorization": "Bearer s3cret"}
        for bad in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}]:
            for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", COMPLETIONS), ("POST", CHAT),
                                 ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/tokenizer_info")]:
                response = httpx.request(method, f"{live.url}{path}", headers=bad, json={"prompt": "x"})
                assert response.status_code == 401, (path, bad)
                assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{live.url}/health").status_code == 200
        page = httpx.get(f"{live.url}/")  # static HTML without data: a browser must see it to enter the key
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert httpx.get(f"{live.url}/v1/models", headers=good).status_code == 200
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{live.url}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        live.close()


def test_overload_gives_503_with_retry_after_before_reading_the_body(tiny_chat_folder):
    llm = LLM(str(tiny_chat_folder), max_num_seqs=1)
    llm.engine.step = _slowed(llm.engine.step)  # so that the running request outlasts the check
    live = LiveServer(llm, max_queued=2)
    long = {"prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(timeout=30) as http:
            streams = []
            for running, waiting in [(1, 0), (1, 1), (1, 2)]:  # one runs, then two wait
                streams.append(http.stream("POST", f"{live.url}{COMPLETIONS}", json=long))
                assert streams[-1].__enter__().status_code == 200
                deadline = time.monotonic() + 10
                while (live.state.engine.snapshot.num_running, live.state.engine.num_waiting) != (running, waiting):
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            response = _post(live, COMPLETIONS, b"this body is never parsed")
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "overloaded"
            for stream in streams:
                stream.__exit__(None, None, None)
        _wait_idle(live)
        assert _post(live, COMPLETIONS, {"prompt": "x", "max_tokens": 1}).status_code == 200
    finally:
        live.close()


def _slowed(step, seconds: float = 0.02):
    def slow_step():
        time.sleep(seconds)
        return step()

    return slow_step


def _wait_idle(live: LiveServer, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while live.metric("llminfer_num_requests_running") or live.metric("llminfer_num_requests_waiting"):
        assert time.monotonic() < deadline, "requests still in flight"
        time.sleep(0.05)


def test_dropped_streams_are_aborted_and_free_their_kv_blocks(tiny_chat_folder):
    llm = LLM(str(tiny_chat_folder), enable_prefix_caching=False)
    advanced = []  # requests advanced per engine step: the compute spent
    step = llm.engine.step

    def counting_step():
        outputs = step()
        advanced.append(len(outputs))
        return outputs

    llm.engine.step = counting_step
    live = LiveServer(llm)
    keep_tokens, drop_tokens = 8, 200

    async def stream(client: httpx.AsyncClient, i: int, drop: bool) -> int:
        body = {"prompt": f"request {i}", "max_tokens": drop_tokens if drop else keep_tokens, "ignore_eos": True,
                "stream": True}
        chunks = 0
        async with client.stream("POST", f"{live.url}{COMPLETIONS}", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    if drop and chunks == 3:
                        return chunks  # leaving the block closes the connection mid-stream
        return chunks

    async def run_all():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(stream(client, i, i % 3 == 0) for i in range(50)))

    try:
        chunks = asyncio.run(run_all())
        assert all(c == 3 for c in chunks[::3])
        _wait_idle(live)
        assert live.metric("llminfer_kv_cache_usage_ratio") == 0.0
        assert live.state.engine.engine.kv_cache_stats().used_blocks == 0
        generated = live.metric("llminfer_generation_tokens_total")  # finished requests only
        assert generated == (50 - 17) * keep_tokens
        finished = live.metric('llminfer_request_success_total{finished_reason="length"}')
        assert finished == 50 - 17
        # The dropped requests stopped consuming compute at once: far from their 200 tokens each.
        assert sum(advanced) < (50 - 17) * keep_tokens + 17 * 30, sum(advanced)
    finally:
        live.close()


def test_non_streamed_request_is_aborted_when_the_client_disconnects(tiny_chat_folder):
    llm = LLM(str(tiny_chat_folder), max_num_seqs=1)
    step = llm.engine.step

    def slow_step():  # 250 steps take seconds however fast the kernels are: the client gives up first
        time.sleep(0.01)
        return step()

    llm.engine.step = slow_step
    live = LiveServer(llm)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live.url}{COMPLETIONS}", json={"prompt": "x", "max_tokens": 250, "ignore_eos": True},
                       timeout=0.3)
        _wait_idle(live, timeout=5)
        assert live.state.engine.engine.kv_cache_stats().used_blocks == 0
    finally:
        live.close()


def test_engine_failure_is_a_500_for_its_requests_then_503(tiny_chat_folder):
    llm = LLM(str(tiny_chat_folder))
    live = LiveServer(llm)
    try:
        def broken_step():
            raise RuntimeError("simulated device fault")

        llm.engine.step = broken_step
        response = _post(live, COMPLETIONS, {"prompt": "x", "max_tokens": 3})
        assert response.status_code == 500
        assert "simulated device fault" in response.json()["error"]["message"]
        assert httpx.get(f"{live.url}/health").status_code == 503
        after = _post(live, COMPLETIONS, {"prompt": "x", "max_tokens": 3})
        assert after.status_code == 503 and "engine failed" in after.json()["error"]["message"]
    finally:
        live.close()


def test_health_is_503_until_the_model_is_loaded():
    from starlette.testclient import TestClient

    with TestClient(create_app(ServerState(ServerConfig()))) as http:
        assert http.get("/health").status_code == 503
        response = http.post(COMPLETIONS, json={"prompt": "x"})
        assert response.status_code == 503 and "loading" in response.json()["error"]["message"]


def test_sigterm_drains_in_flight_requests_then_exits(tiny_chat_folder):
    import signal
    import subprocess
    import sys

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "llminfer", "serve", "--model", str(tiny_chat_folder),
                                "--port", str(port), "--served-model-name", MODEL, "--max-num-seqs", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(process, url)
        body = {"prompt": "x", "max_tokens": 250, "ignore_eos": True, "stream": True}

        async def drain_scenario():
            async with httpx.AsyncClient(timeout=60) as http:
                async def consume(response: httpx.Response) -> list[dict]:
                    return [json.loads(line[6:]) async for line in response.aiter_lines()
                            if line.startswith("data: {")]

                # six requests in flight: one running, five waiting (--max-num-seqs 1)
                responses = [await http.send(http.build_request("POST", f"{url}{COMPLETIONS}", json=body),
                                             stream=True) for _ in range(6)]
                process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                refused = await http.post(f"{url}{COMPLETIONS}", json={"prompt": "x", "max_tokens": 1})
                health = await http.get(f"{url}/health")
                chunks = await asyncio.gather(*(consume(r) for r in responses))
                return refused, health, chunks

        refused, health, chunks = asyncio.run(drain_scenario())
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert health.status_code == 503
        for stream in chunks:  # every in-flight request finished in full
            assert stream[-1]["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_greedy_output_over_http_equals_llm_generate_on_smollm2(smollm2_llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = "The three primary colors are"
    expected_chat = smollm2_llm.chat(messages, SamplingParams(max_tokens=24, temperature=0))[0]
    expected_text = smollm2_llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0))[0]
    live = LiveServer(smollm2_llm)  # the same engine, now owned by the server's worker thread
    try:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
        assert chat.choices[0].message.content == expected_chat.text
        assert chat.usage.completion_tokens == len(expected_chat.token_ids)
        completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert completion.choices[0].text == expected_text.text
    finally:
        live.close()


def test_bench_serve_reports_throughput_and_latency_percentiles(server, capsys):
    from llminfer.cli.main import main

    code = main(["bench", "serve", "--url", server.url, "--model", MODEL, "--num-prompts", "6", "--concurrency", "3",
                 "--input-len", "8", "--output-len", "5", "--vocab-size", "320", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["completed"] == 6 and report["failed"] == 0
    assert report["output_tokens_per_s"] > 0 and report["requests_per_s"] > 0
    assert 0 < report["ttft_s"]["p50"] <= report["ttft_s"]["p90"] <= report["ttft_s"]["p99"]
    assert 0 < report["tpot_s"]["p50"] <= report["tpot_s"]["p99"]


def test_bench_serve_against_no_server_is_a_one_line_error(capsys):
    from llminfer.cli.main import main

    assert main(["bench", "serve", "--url", f"http://127.0.0.1:{free_port()}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("llminfer: error: cannot reach the server") and "\n" not in error


def test_no_random_body_produces_a_500(server):
    """A small fuzz: fields of the right names with values of every JSON type never crash a handler."""
    import random

    rng = random.Random(0)
    values = [None, True, False, 0, -1, 1, 3, 2.5, -0.5, 1e308, "", "x", "hello world", [], [1, 2], ["a", ""],
              [[1], [2]], {}, {"role": "user"}, [{"role": "user", "content": "hi"}],
              [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], [{"role": "user", "content": 5}]]
    fields = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
              "top_k", "min_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
              "logprobs", "top_logprobs", "stream", "stream_options", "user", "echo"]
    with httpx.Client(timeout=30) as http:
        for _ in range(150):
            body = {f: rng.choice(values) for f in rng.sample(fields, rng.randint(1, 6))}
            body.setdefault("max_tokens", 2)
            path = rng.choice([COMPLETIONS, CHAT])
            response = http.post(f"{server.url}{path}", json=body)
            assert response.status_code in (200, 400, 404), (path, body, response.text)
            if response.status_code != 200:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_streamed_logprobs_carry_running_text_offsets(server):
    body = {"model": MODEL, "prompt": "Lists", "max_tokens": 8, "temperature": 0, "stream": True, "logprobs": 1,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert len(tokens) == 8 and offsets[0] == 0 and offsets == sorted(offsets)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert all(o <= len(text) for o in offsets)


def test_serve_with_a_missing_model_exits_2_with_one_line(tmp_path):
    from test_cli import assert_one_line_error, run_cli

    result = run_cli("serve", "--model", str(tmp_path / "no-such-model"), "--port", str(free_port()), timeout=120)
    assert_one_line_error(result, "no-such-model")


def test_streamed_events_never_contain_raw_line_separators():
    """Generated text may hold U+2028, U+0085 or other characters that line-splitting SSE clients treat as line
    ends (httpx's aiter_lines does): events must stay on one line."""
    import asyncio

    from llminfer.server.app import _sse

    async def chunks():
        yield {"text": "a\u2028b\x85c\u2029d\r\ne"}

    async def body():
        return [part async for part in _sse(chunks()).body_iterator]

    event = asyncio.run(body())[0]
    assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1
    assert json.loads(event[len("data: "):]) == {"text": "a\u2028b\x85c\u2029d\r\ne"}


def test_bench_serve_compares_with_a_llama_server_it_starts_and_stops(server, tiny_chat_folder, smollm2_gguf,
                                                                      tmp_path, capsys):
    """A stand-in llama-server (our own server under that name, which records how bench started it) shows the
    process handling: started with one slot per request in flight and the same threads, waited for, loaded with
    the same requests, stopped."""
    import stat
    import sys

    from llminfer.cli.main import main

    argv_file = tmp_path / "argv.json"
    fake = tmp_path / "llama-server"
    fake.write_text(f"""#!{sys.executable}
import json, os, sys
json.dump(sys.argv[1:], open({str(argv_file)!r}, "w"))
port = sys.argv[sys.argv.index("--port") + 1]
os.execv(sys.executable, [sys.executable, "-m", "llminfer", "serve", "--model", {str(tiny_chat_folder)!r},
                          "--port", port])
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    port = free_port()
    code = main(["bench", "serve", "--url", server.url, "--model", MODEL, "--num-prompts", "4", "--concurrency", "2",
                 "--input-len", "8", "--output-len", "5", "--vocab-size", "320", "--compare", "llama-server",
                 "--llama-server", str(fake), "--gguf", "smollm2-135m", "--llama-server-port", str(port),
                 "--threads", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and [r["engine"] for r in report["results"]] == ["llminfer", "llama-server"]
    assert all(r["completed"] == 4 and r["failed"] == 0 for r in report["results"])
    assert report["ratio_vs_llama_server"]["output_tokens_per_s"] > 0
    argv = json.loads(argv_file.read_text())
    assert argv == ["-m", str(smollm2_gguf), "--host", "127.0.0.1", "--port", str(port), "-np", "2",
                    "-c", str(2 * (8 + 5 + 16)), "-t", "1"]
    with pytest.raises(httpx.TransportError):  # stopped after its run
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_bench_serve_compare_without_llama_server_says_how_to_build_it(server, tmp_path, capsys, monkeypatch):
    from llminfer.cli.main import main

    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["bench", "serve", "--url", server.url, "--compare", "llama-server"]) == 2
    error = capsys.readouterr().err.strip()
    assert "no llama-server on PATH" in error and "\n" not in error
    assert "cmake -B build -DLLAMA_BUILD_SERVER=ON" in error
    assert main(["bench", "serve", "--url", server.url, "--compare", "llama-server", "--llama-server",
                 str(tmp_path / "missing")]) == 2
    assert "not an executable file" in capsys.readouterr().err
