"""Every code block of the README, run: its commands with a tiny model standing in for the default one (each
command exactly as written otherwise, in a scratch folder, so one line's output is the next line's input), and
its Python snippets as written, against the real default model. A README line that nobody can run is a bug."""

from __future__ import annotations

import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llminfer.cli.lite import build_parser as build_lite_parser
from llminfer.cli.lite import main as lite_main
from llminfer.cli.main import build_parser
from llminfer.cli.main import main as llminfer_main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

# Commands the test cannot run, and why; each still has to parse with the real command-line parser.
NOT_RUN = [
    (r"^python3 -m venv|^\. |^pip ", "an install: .ci/run runs the Quick start's, the others install other things"),
    (r"^cd |^cmake |^tar ", "builds llama-server (15 minutes), not part of the test install"),
    (r"--compare llama\.cpp|--compare llama-server|random-llama-1b", "needs llama.cpp, not part of the test install"),
    (r"--tp 3|--nnodes", "the real model on three ranks and several hosts: tests/test_parallel.py runs them"),
    (r"^llminfer serve -m|^llminfer serve --tp", "a second server: the first serve line is run, below"),
]
# Stand-ins for the files a reader has: the tiny model for the default one and for "your own folder".
TINY_MODELS = {"smollm2-135m", "./my-hf-folder", "./my-llama", "./Llama-3.2-1B"}
# Fewer requests for the real model behind the README's server (appended: argparse takes the last value).
SMALL_WORKLOADS = {("bench", "serve"): ["--num-prompts", "4", "--concurrency", "2", "--output-len", "8"]}


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def shell_commands() -> list[str]:
    """Each command of the bash blocks: continuation lines joined, comments dropped, `a && b` split."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            command: list[str] = []
            for word in [*words, "&&"]:
                if word == "&&":
                    commands.append(shlex.join(command)) if command else None
                    command = []
                else:
                    command.append(word)
    return commands


SNIPPETS = code_blocks("python")


def snippet_id(snippet: str) -> str:
    return next(line for line in snippet.splitlines() if line and not line.startswith(("from ", "import ")))[:40]


def not_run_reason(command: str) -> str | None:
    return next((why for pattern, why in NOT_RUN if re.search(pattern, command)), None)


def split_program(command: str) -> tuple[dict[str, str], str, list[str]]:
    """(environment assignments, program, arguments); `torchrun ... -m llminfer ARGS` is llminfer ARGS."""
    words = shlex.split(command)
    env = {}
    while re.fullmatch(r"[A-Z_]+=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    if words[0] == "torchrun":
        return env, "llminfer", words[words.index("-m") + 2:]
    return env, words[0], words[1:]


def test_the_readme_has_what_this_test_reads():
    assert len(code_blocks("bash")) >= 8 and len(shell_commands()) >= 50
    assert any("LiteModel" in s for s in SNIPPETS) and any("GPTQ" in s for s in SNIPPETS)


def test_every_command_parses_with_the_real_parser():
    parsers = {"llminfer": build_parser(), "llminfer-lite": build_lite_parser()}
    problems, parsed = [], 0
    for command in shell_commands():
        env, program, args = split_program(command)
        if program in parsers:
            try:
                parsers[program].parse_args(args)
                parsed += 1
            except SystemExit as exc:  # argparse's error: the README shows a flag or value that does not exist
                problems.append(f"does not parse ({exc.code}): {command}")
        elif program not in ("curl", "pytest") and not not_run_reason(command):
            problems.append(f"neither run nor explained: {command}")
    assert problems == []
    assert parsed >= 40


def test_ci_installs_and_tests_exactly_as_the_quick_start_says():
    quick_start = code_blocks("bash")[1].strip()
    assert "pytest" in quick_start
    assert quick_start in (ROOT / ".ci" / "run").read_text()


def substitute(args: list[str], tiny: str, gguf: str) -> list[str]:
    """The tiny model for the default model and for placeholder folders, a real GGUF for the placeholder one."""
    args = [tiny if arg in TINY_MODELS else gguf if arg == "model.Q4_K_M.gguf" else arg for arg in args]
    takes_model = args[0] in ("generate", "chat", "perplexity") or args[:2] in (["bench", "latency"],
                                                                                  ["bench", "throughput"])
    if takes_model and not {"-m", "--model"} & set(args):  # the default model
        at = 2 if args[0] == "bench" else 1
        args = [*args[:at], "-m", tiny, *args[at:]]
    for prefix, extra in SMALL_WORKLOADS.items():
        if tuple(args[:len(prefix)]) == prefix:
            args = [*args, *extra]
    return args


def wait_for_health(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read() if process.stderr else "server exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"server at {url} not healthy after {timeout} s")


@pytest.fixture(scope="module")
def readme_server():
    """The README's first `llminfer serve` line, on a free port: the default model, as the snippets expect."""
    from llminfer.parallel.launch import free_port

    serve = next(c for c in shell_commands() if c.startswith("llminfer serve") and not not_run_reason(c))
    port = free_port()
    args = [arg if arg != "8000" else str(port) for arg in shlex.split(serve)[1:]]
    process = subprocess.Popen([sys.executable, "-m", "llminfer", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def readme_tiny(tiny_chat_folder, tmp_path_factory) -> Path:
    """The tiny chat model with room for the README's longest workload (512 shared + 128 + 128 tokens)."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("readme-tiny") / "model"
    shutil.copytree(tiny_chat_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    return folder


@pytest.mark.slow
def test_every_command_runs(readme_tiny, smollm2_gguf, readme_server, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the README's ./smol-w4, ./smollm2-onnx ... are made and read here
    threads = torch.get_num_threads()
    ran = []
    for command in shell_commands():
        env, program, args = split_program(command)
        if not_run_reason(command) or program == "pytest" or args[:1] == ["serve"]:
            continue  # pytest: this test is part of that run; serve: the readme_server fixture runs it
        args = [arg.replace("http://127.0.0.1:8000", readme_server) for arg in args]
        if program == "curl":
            result = subprocess.run(["curl", "-sS", "--fail", *args], capture_output=True, text=True, timeout=120)
            assert result.returncode == 0 and "data: [DONE]" in result.stdout, (command, result.stderr)
            ran.append(command)
            continue
        args = substitute(args, str(readme_tiny), str(smollm2_gguf))
        if command.startswith("torchrun"):  # the real launcher, as written
            launcher = shlex.split(command)[1:shlex.split(command).index("-m")]
            result = subprocess.run([sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "llminfer",
                                     *args], capture_output=True, text=True, timeout=300)
            code, err = result.returncode, result.stderr
        else:
            for name, value in env.items():
                monkeypatch.setenv(name, value)
            monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n/exit\n"))  # `llminfer chat` reads its turns
            code = (lite_main if program == "llminfer-lite" else llminfer_main)(args)
            torch.set_num_threads(threads)  # --threads 1 must not slow down the rest of the suite
            err = capsys.readouterr().err
        assert code == 0, f"{command} -> {shlex.join(args)}: exit {code}\n{err[-2000:]}"
        ran.append(command)
    assert len(ran) >= 35, ran


@pytest.mark.slow
@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if "OpenAI(" not in s and "client." not in s],
                         ids=snippet_id)
def test_python_snippet_runs_as_written(snippet, readme_tiny, tmp_path):
    if "LiteModel" in snippet:  # it reads the export that the README's command wrote; here, of the tiny model
        assert llminfer_main(["export", str(readme_tiny), "-o", str(tmp_path / "smollm2-onnx")]) == 0
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "the snippet printed nothing"


@pytest.mark.slow
def test_client_snippets_run_as_written_against_the_server(readme_server, tmp_path):
    client_snippets = [s for s in SNIPPETS if "OpenAI(" in s or "client." in s]
    assert len(client_snippets) == 2
    program = "\n".join(client_snippets).replace("http://127.0.0.1:8000", readme_server)
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    import json

    person, arguments = json.loads(lines[-2]), json.loads(lines[-1])  # the comments promise valid JSON
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str)  # additionalProperties: false

