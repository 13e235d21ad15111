"""`llminfer bench latency --compare llama.cpp`: llama.cpp (llama-cpp-python) on the same GGUF, same prompt ids,
same thread count, greedy without early stop, measured in the same run.

llama.cpp runs in a child process (`python -m llminfer.cli.llama_cpp_peer`, a JSON job on stdin, JSON timings on
stdout): its OpenMP runtime and PyTorch's in one process have crashed. It decodes one sequence at a time, so a
batch of prompts is run one prompt after another (as the lite runtime's bench does).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from typing import Callable

from llminfer.errors import LLMInferError

INSTALL_HINT = ("--compare llama.cpp needs llama-cpp-python (an optional extra, not part of the test install): "
                "pip install -e '.[bench]' builds llama.cpp from source (about 15 minutes on 2 cores; "
                "CMAKE_ARGS=\"-DGGML_NATIVE=ON\" for this CPU's instruction sets)")


def check_available() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise LLMInferError(INSTALL_HINT)


def measure(gguf: str, prompts: list[list[int]], output_len: int, iters: int, threads: int,
            log: Callable[[str], None]) -> tuple[list[tuple[float, float]], list[list[int]]]:
    """(ttft seconds, decode seconds) per timed run (after one warm-up), and the greedy tokens of the last run."""
    check_available()
    job = {"gguf": gguf, "prompts": prompts, "output_len": output_len, "iters": iters, "threads": threads}
    log(f"llama.cpp: {gguf}, {threads} threads, {iters} runs (in a child process)")
    done = subprocess.run([sys.executable, "-m", "llminfer.cli.llama_cpp_peer"], input=json.dumps(job),
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LLMInferError(f"llama.cpp failed on {gguf} (exit code {done.returncode}): {tail}")
    result = json.loads(done.stdout)
    return [tuple(run) for run in result["runs"]], result["tokens"]


def _run(job: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama

    longest = max(len(p) for p in job["prompts"])
    model = Llama(job["gguf"], n_ctx=longest + job["output_len"] + 8, n_batch=max(longest, 32),
                  n_threads=job["threads"], n_threads_batch=job["threads"], logits_all=False, verbose=False)

    vocab = model.n_vocab()

    def greedy() -> int:  # the last position's logits, straight from the context (only they are computed)
        return int(np.argmax(np.ctypeslib.as_array(model._ctx.get_logits(), shape=(vocab,))))

    def one_run() -> tuple[float, float, list[list[int]]]:
        ttft = decode = 0.0
        tokens = []
        for prompt in job["prompts"]:
            model.reset()
            start = time.perf_counter()
            model.eval(prompt)  # prefill
            out = [greedy()]
            first = time.perf_counter()
            for _ in range(job["output_len"] - 1):
                model.eval([out[-1]])
                out.append(greedy())
            ttft, decode = ttft + first - start, decode + time.perf_counter() - first
            tokens.append(out)
        return ttft, decode, tokens

    one_run()  # warm-up
    runs = [one_run() for _ in range(job["iters"])]
    return {"runs": [[r[0], r[1]] for r in runs], "tokens": runs[-1][2]}


if __name__ == "__main__":
    print(json.dumps(_run(json.load(sys.stdin))))
