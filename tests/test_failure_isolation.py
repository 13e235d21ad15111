"""One request cannot take the engine or the server down: extreme sampling values are either refused by name
or sampled safely, a request whose logits are not finite fails alone (its KV blocks freed), and the others in
its batch get exactly the tokens they get when run alone."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from llminfer import LLM, SamplingParams
from llminfer.engine.sampler import Sampler, SamplingInput
from llminfer.errors import InvalidSamplingParamsError, RequestFailedError

COMPLETIONS = "/v1/completions"
NORMAL_PROMPTS = [[4, 8, 15, 16, 23, 42], [7, 7, 1, 2], [100, 200, 300], [9, 19, 29, 39, 49]]
NORMAL = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama_folder) -> LLM:
    return LLM(str(tiny_llama_folder))


@pytest.fixture(scope="module")
def alone(tiny_llm) -> list[list[int]]:
    """Each normal prompt's greedy tokens, generated on its own."""
    return [tiny_llm.generate([p], NORMAL)[0].token_ids for p in NORMAL_PROMPTS]


# --- the sampler, by hand ----------------------------------------------------------------------

def test_non_finite_rows_get_an_error_and_the_others_their_tokens():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    logits[1, 3] = float("nan")
    logits[2, 7] = float("inf")
    logits[3, :10] = float("-inf")  # masked tokens are fine
    rows = [SamplingInput(SamplingParams(temperature=0, logprobs=2), [], [], None) for _ in range(4)]
    out = Sampler()(logits, rows)
    assert out.errors[0] is None and out.errors[3] is None
    assert "non-finite logits" in out.errors[1] and "non-finite logits" in out.errors[2]
    assert out.token_ids[0] == int(logits[0].argmax()) and out.token_ids[3] == int(logits[3].argmax())
    assert out.token_ids[1] == out.token_ids[2] == -1
    assert out.logprobs[1] is None and out.logprobs[2] is None and out.logprobs[0] is not None


def test_all_masked_row_is_an_error_not_a_crash():
    logits = torch.full((1, 10), float("-inf"))
    out = Sampler()(logits, [SamplingInput(SamplingParams(temperature=1.0), [], [], None)])
    assert out.token_ids == [-1] and "non-finite" in out.errors[0]


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-30, 1e-6])
def test_a_temperature_below_the_floor_is_greedy(temperature):
    params = SamplingParams(temperature=temperature)
    assert params.is_greedy
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1)) * 30
    out = Sampler()(logits, [SamplingInput(params, [], [], torch.Generator().manual_seed(2)) for _ in range(3)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_tiny_temperatures_above_the_floor_and_huge_logits_stay_finite():
    logits = torch.tensor([[3e38, 1e38, -3e38, 0.0], [1e30, -1e30, 5.0, 4.0]])
    params = SamplingParams(temperature=1e-5, repetition_penalty=0.01, frequency_penalty=-2, presence_penalty=-2)
    rows = [SamplingInput(params, [0, 1, 2], [0, 0, 1], torch.Generator().manual_seed(0)) for _ in range(2)]
    out = Sampler()(logits, rows)
    assert out.errors == [None, None] and all(0 <= t < 4 for t in out.token_ids)


def test_top_p_1_keeps_every_token_whatever_the_rounding():
    from llminfer.engine.sampler import filter_logits

    # many near-equal tokens: the cumulative sum reaches 1.0 by rounding before the last one
    logits = torch.zeros(1, 49152) + torch.rand(1, 49152, generator=torch.Generator().manual_seed(0)) * 1e-3
    out = filter_logits(logits, torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert torch.isfinite(out).all()


# --- validation admits only what the engine can represent ----------------------------------------

@pytest.mark.parametrize("field,value", [
    ("repetition_penalty", 1e-300), ("repetition_penalty", 5e-324), ("repetition_penalty", 1e300),
    ("seed", 2**64), ("seed", 2**80), ("seed", -1), ("top_k", 2**63), ("top_k", 2**31),
    ("temperature", "0.5"), ("max_tokens", True), ("stop_token_ids", [-1]),
])
def test_values_the_engine_cannot_represent_are_refused_by_name(field, value):
    with pytest.raises(InvalidSamplingParamsError, match=field) as caught:
        SamplingParams(**{field: value})
    assert caught.value.field == field


def test_seeds_must_leave_room_for_every_sample():
    SamplingParams(seed=2**64 - 1)  # one sample: the largest 64-bit seed
    SamplingParams(seed=2**64 - 2, n=2)
    with pytest.raises(InvalidSamplingParamsError, match=r"seed.*2\*\*64 - n"):
        SamplingParams(seed=2**64 - 1, n=2)


def test_top_k_beyond_the_vocabulary_is_refused_at_submission(tiny_llm):
    with pytest.raises(InvalidSamplingParamsError, match="top_k=321: expected at most the vocabulary size 320"):
        tiny_llm.generate([[1, 2]], SamplingParams(top_k=321))
    assert tiny_llm.generate([[1, 2]], SamplingParams(top_k=320, max_tokens=2, seed=0))[0].finish_reason == "length"


def test_the_largest_seed_generates(tiny_llm):
    params = SamplingParams(max_tokens=4, seed=2**64 - 2, n=2, ignore_eos=True)
    first, again = (tiny_llm.generate([[3, 4]], params)[0] for _ in range(2))
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]


# --- the engine: extreme requests batched with normal ones ---------------------------------------

EXTREME_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(
    [0.0, 5e-324, 1e-300, 1e-45, 1e-30, 1e-6, 1e-5, 0.01, 1.0, 2.0, 100.0, 1e30, 1e300, -1e-300, -2.0]))


def _run_beside_normal_requests(llm: LLM, alone: list[list[int]], extreme: SamplingParams) -> None:
    """The extreme request runs in one batch with the normal ones: they get exactly their tokens alone."""
    prompts = [NORMAL_PROMPTS[0], [5, 6, 7], *NORMAL_PROMPTS[1:]]
    outputs = llm.generate(prompts, [NORMAL, extreme, *[NORMAL] * (len(NORMAL_PROMPTS) - 1)])
    assert [outputs[i].token_ids for i in (0, 2, 3, 4)] == alone
    for choice in outputs[1].outputs:
        assert choice.finish_reason == "length" and all(0 <= t < 320 for t in choice.token_ids)
    assert llm.kv_cache_stats().used_blocks == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(temperature=st.floats(0, 1e300), top_p=st.floats(5e-324, 1.0), min_p=st.floats(0.0, 1.0),
       repetition=st.floats(0.01, 100.0), presence=st.floats(-2.0, 2.0), frequency=st.floats(-2.0, 2.0),
       top_k=st.integers(-1, 320), seed=st.one_of(st.none(), st.integers(0, 2**64 - 3)), n=st.integers(1, 3))
def test_admitted_extremes_are_sampled_safely_beside_normal_requests(
        tiny_llm, alone, temperature, top_p, min_p, repetition, presence, frequency, top_k, seed, n):
    """Every value validation admits, down to subnormal floats and up to the bounds, samples without error."""
    extreme = SamplingParams(max_tokens=6, n=n, temperature=temperature, top_p=top_p, min_p=min_p, top_k=top_k,
                             repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency,
                             seed=seed, ignore_eos=True)
    _run_beside_normal_requests(tiny_llm, alone, extreme)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(temperature=EXTREME_FLOATS, top_p=EXTREME_FLOATS, min_p=EXTREME_FLOATS, repetition=EXTREME_FLOATS,
       presence=EXTREME_FLOATS, frequency=EXTREME_FLOATS,
       top_k=st.one_of(st.integers(-3, 400), st.sampled_from([2**31, 2**63, -(2**63)])),
       seed=st.one_of(st.none(), st.integers(-1, 2**64 + 1), st.sampled_from([2**64 - 1, 2**80])),
       n=st.integers(1, 3))
def test_random_extreme_requests_are_refused_by_name_or_run_without_disturbing_their_batch(
        tiny_llm, alone, temperature, top_p, min_p, repetition, presence, frequency, top_k, seed, n):
    try:
        extreme = SamplingParams(max_tokens=6, n=n, temperature=temperature, top_p=top_p, min_p=min_p, top_k=top_k,
                                 repetition_penalty=repetition, presence_penalty=presence,
                                 frequency_penalty=frequency, seed=seed, ignore_eos=True)
    except InvalidSamplingParamsError as exc:  # a refusal names the field
        assert exc.field and f"invalid sampling parameter {exc.field}=" in str(exc)
        return
    try:
        _run_beside_normal_requests(tiny_llm, alone, extreme)
    except InvalidSamplingParamsError as exc:  # top_k over the vocabulary: refused before anything ran
        assert exc.field == "top_k" and extreme.top_k > 320
        assert not tiny_llm.engine.has_unfinished_requests()


def test_llm_recovers_after_a_failed_step(tiny_llm, alone, monkeypatch):
    runner = tiny_llm.engine.runner
    calls = {"n": 0}
    real = runner.execute  # the forward pass of a step

    def fails_once(step, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device fault")
        return real(step, *args, **kwargs)

    monkeypatch.setattr(runner, "execute", fails_once)
    with pytest.raises(RuntimeError, match="simulated device fault"):
        tiny_llm.generate(NORMAL_PROMPTS, NORMAL)
    assert not tiny_llm.engine.has_unfinished_requests() and tiny_llm.kv_cache_stats().used_blocks == 0
    assert [o.token_ids for o in tiny_llm.generate(NORMAL_PROMPTS, NORMAL)] == alone


# --- a model whose logits are NaN: each request fails alone ---------------------------------------

@pytest.fixture(scope="module")
def nan_folder(tiny_chat_folder, tmp_path_factory):
    """The tiny chat model with one NaN in the last layer's down projection: every logit is NaN."""
    folder = tmp_path_factory.mktemp("tiny-nan")
    for item in tiny_chat_folder.iterdir():
        if item.name != "model.safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    tensors = load_file(tiny_chat_folder / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_non_finite_logits_fail_the_request_and_free_its_blocks(nan_folder):
    llm = LLM(str(nan_folder))
    for _ in range(2):  # and again: the engine is still usable
        outputs = llm.generate(["hello", [5, 6, 7]], SamplingParams(max_tokens=4, n=2))
        for output in outputs:
            assert [c.finish_reason for c in output.outputs] == ["error", "error"]
            assert "non-finite logits" in output.error and output.token_ids == []
        assert not llm.engine.has_unfinished_requests() and llm.kv_cache_stats().used_blocks == 0


def test_cli_reports_non_finite_logits_in_one_line(nan_folder, capsys):
    from llminfer.cli.main import main

    assert main(["generate", "-m", str(nan_folder), "--greedy", "-n", "4", "hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "llminfer: error: the model produced non-finite logits (NaN or inf) for this request"


@pytest.mark.parametrize("args,field", [(["--seed", str(2**80)], "seed"), (["--top-k", str(2**63)], "top_k"),
                                        (["--repetition-penalty", "1e-300"], "repetition_penalty")])
def test_cli_refuses_unrepresentable_values_in_one_line(tiny_chat_folder, capsys, args, field):
    from llminfer.cli.main import main

    assert main(["generate", "-m", str(tiny_chat_folder), "-n", "2", *args, "hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"llminfer: error: invalid sampling parameter {field}=")


# --- the server ------------------------------------------------------------------------------------

EXTREME_BODIES = [
    {"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 1e-30},
    {"repetition_penalty": 1e-300}, {"repetition_penalty": 1e300}, {"top_p": 1e-300},
    {"top_k": 2**63}, {"seed": 2**64 - 1, "n": 2}, {"seed": 2**80},
    {"frequency_penalty": 2, "presence_penalty": 2, "temperature": 1e-30},
    {"frequency_penalty": -2, "presence_penalty": -2, "temperature": 1e-30},
]


@pytest.fixture(scope="module")
def live(tiny_chat_folder):
    from test_server import LiveServer

    server = LiveServer(LLM(str(tiny_chat_folder)))
    yield server
    server.close()


def _check_extreme_response(response: httpx.Response, extra: dict) -> None:
    if response.status_code == 200:
        choices = response.json()["choices"]
        assert len(choices) == extra.get("n", 1) and all(c["finish_reason"] == "length" for c in choices)
    else:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        field = error["param"]
        assert field in extra and field in error["message"], error


@pytest.mark.parametrize("extra", EXTREME_BODIES, ids=lambda e: ",".join(f"{k}={v:g}" for k, v in e.items()))
def test_extreme_request_alone_gets_200_or_a_400_naming_the_field(live, extra):
    body = {"prompt": "Hello", "max_tokens": 4, "ignore_eos": True, **extra}
    _check_extreme_response(httpx.post(f"{live.url}{COMPLETIONS}", json=body, timeout=60), extra)
    assert httpx.get(f"{live.url}/health").status_code == 200


def test_extreme_requests_among_eight_streams_leave_them_and_the_server_intact(live, tiny_chat_folder):
    from test_server import LiveServer  # noqa: F401 - the fixture's module

    oracle = LLM(str(tiny_chat_folder))
    prompts = [f"Stream {i} says" for i in range(8)]
    expected = [o.text for o in oracle.generate(prompts, SamplingParams(max_tokens=16, temperature=0,
                                                                        ignore_eos=True))]

    async def scenario():
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as http:
            async def stream(prompt: str) -> str:
                body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "stream": True}
                text = []
                async with http.stream("POST", COMPLETIONS, json=body) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            assert "error" not in chunk, chunk
                            text.append(chunk["choices"][0]["text"])
                return "".join(text)

            async def extreme(extra: dict) -> httpx.Response:
                await asyncio.sleep(0.01)
                return await http.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": 4, "ignore_eos": True,
                                                          **extra})

            return await asyncio.gather(asyncio.gather(*(stream(p) for p in prompts)),
                                        asyncio.gather(*(extreme(e) for e in EXTREME_BODIES)))

    texts, responses = asyncio.run(scenario())
    assert texts == expected
    for extra, response in zip(EXTREME_BODIES, responses):
        _check_extreme_response(response, extra)
    assert httpx.get(f"{live.url}/health").status_code == 200
    normal = httpx.post(f"{live.url}{COMPLETIONS}", json={"prompt": prompts[0], "max_tokens": 16, "temperature": 0,
                                                         "ignore_eos": True}, timeout=60)
    assert normal.status_code == 200 and normal.json()["choices"][0]["text"] == expected[0]


def test_nan_model_requests_fail_alone_with_500_and_the_server_stays_healthy(nan_folder):
    from test_server import LiveServer

    server = LiveServer(LLM(str(nan_folder)))
    try:
        url = f"{server.url}{COMPLETIONS}"
        plain = httpx.post(url, json={"prompt": "hi", "max_tokens": 4}, timeout=60)
        assert plain.status_code == 500
        error = plain.json()["error"]
        assert error["type"] == "server_error" and "non-finite logits" in error["message"]
        with httpx.stream("POST", url, json={"prompt": "hi", "max_tokens": 4, "stream": True}, timeout=60) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "non-finite logits" in json.loads(events[-2])["error"]["message"]
        chat = httpx.post(f"{server.url}/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, timeout=60)
        assert chat.status_code == 500 and "non-finite logits" in chat.json()["error"]["message"]
        assert httpx.get(f"{server.url}/health").status_code == 200
        engine = server.state.engine.engine
        assert engine.kv_cache_stats().used_blocks == 0 and not engine.has_unfinished_requests()
        assert server.metric("llminfer_num_requests_running") == 0
    finally:
        server.close()


def test_sigterm_exits_after_the_engine_failed(tiny_chat_folder, tmp_path):
    """A failed engine has nothing in flight: the drain must not wait for requests that will never finish."""
    import signal
    import subprocess
    import sys
    import time

    from test_server import free_port, wait_healthy

    # A sitecustomize that breaks the model runner after the first request, inside the served process.
    (tmp_path / "sitecustomize.py").write_text(
        "import llminfer.engine.model_runner as m\n"
        "real = m.ModelRunner.execute\n"
        "calls = []\n"
        "def execute(self, step):\n"
        "    calls.append(1)\n"
        "    if len(calls) > 3:\n"
        "        raise RuntimeError('simulated device fault')\n"
        "    return real(self, step)\n"
        "m.ModelRunner.execute = execute\n")
    port = free_port()
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-m", "llminfer", "serve", "--model", str(tiny_chat_folder),
                                "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(process, url)
        response = httpx.post(f"{url}{COMPLETIONS}", json={"prompt": "x", "max_tokens": 50, "ignore_eos": True},
                              timeout=60)
        assert response.status_code == 500 and "simulated device fault" in response.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 503
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert time.monotonic() - started < 30
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_lite_sampler_refuses_non_finite_logits_and_keeps_extremes_finite():
    import numpy as np

    from llminfer.lite.sampler import sample

    rng = np.random.default_rng(0)
    with pytest.raises(RequestFailedError, match="non-finite logits"):
        sample(np.array([np.nan, 1.0], dtype=np.float32), SamplingParams(), [], [], rng)
    huge = np.array([3e38, 1e38, -3e38, 0.0], dtype=np.float32)
    params = SamplingParams(temperature=1e-5, repetition_penalty=0.01, frequency_penalty=-2)
    assert sample(huge, params, [0, 1], [0, 0], rng) in range(4)
    assert sample(huge, SamplingParams(temperature=1e-300), [], [], rng) == 0
