"""Schemathesis against the live server, driven by its own /openapi.json: bodies generated from the request
schemas (valid and invalid), every response checked to be no server error (5xx). A request the server cannot
serve must be a 4xx naming why; a request it can serve must not crash it."""

from __future__ import annotations

import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from test_server import LiveServer

from llminfer import LLM

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402

EXAMPLES = int(os.environ.get("LLMINFER_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def live(tiny_chat_folder):
    # a short context and few tokens per answer: generated max_tokens values are refused or quick
    server = LiveServer(LLM(str(tiny_chat_folder), max_model_len=128), max_n=4, max_batch_prompts=8)
    yield server
    assert httpx.get(f"{server.url}/health").status_code == 200  # nothing took the engine down
    server.close()


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="LLMINFER_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=list(HealthCheck), database=None)


def test_no_request_is_a_server_error(live):
    # Schemathesis's own pytest plugin does not run under pytest 9, so each operation's strategy is driven here.
    api = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"}
    for operation in operations:
        @FUZZ
        @given(case=operation.as_strategy())
        def call(case):
            case.call_and_validate(base_url=live.url, checks=[not_a_server_error], timeout=60)

        call()
