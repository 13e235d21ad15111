"""The chat page at / in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium):
type a question, watch the answer stream in, press stop mid-stream, ask again and see it finish."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from test_server import LiveServer, _slowed

from llminfer import LLM


@pytest.fixture()
def browser(tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        message = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("LLMINFER_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    yield session
    session.quit()


def _wait(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_chat_page_streams_an_answer_and_stop_aborts_it(browser, tiny_chat_folder):
    from selenium.webdriver.common.by import By

    llm = LLM(str(tiny_chat_folder))
    llm.engine.step = _slowed(llm.engine.step, 0.05)  # about 20 tokens/s: slow enough to watch and stop
    live = LiveServer(llm)
    try:
        browser.get(live.url + "/")
        find = lambda css: browser.find_element(By.CSS_SELECTOR, css)  # noqa: E731
        _wait(lambda: "tiny" in find("#model").text, what="the model name from /v1/models")
        find("#max_tokens").clear()
        find("#max_tokens").send_keys("200")
        find("#input").send_keys("What is a tuple?")
        find("#send").click()
        _wait(lambda: find(".message.user").text == "What is a tuple?", what="the user message")
        reply = find(".message.assistant")
        first = _wait(lambda: reply.text, what="the first streamed text")
        _wait(lambda: len(reply.text) > len(first) + 5, what="more streamed text")
        assert reply.get_attribute("data-state") == "streaming"
        assert live.state.engine.snapshot.num_running == 1
        find("#stop").click()
        _wait(lambda: reply.get_attribute("data-state") == "stopped", what="the stopped state")
        assert "finish: stopped" in reply.text
        _wait(lambda: live.state.engine.snapshot.num_running == 0 and live.state.engine.snapshot.kv_cache_usage == 0,
              what="the request to be aborted on the server")
        assert find("#send").is_enabled() and not find("#stop").is_enabled()

        # A second question runs to its end (max_tokens 6), with the first exchange as history.
        find("#max_tokens").clear()
        find("#max_tokens").send_keys("6")
        find("#input").send_keys("And a list?")
        find("#send").click()
        _wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".message.assistant")) == 2, what="a second reply")
        last = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
        _wait(lambda: last.get_attribute("data-state") == "done", what="the second answer to finish")
        assert "finish: " in last.text
        assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        live.close()
