"""`llminfer bench latency --compare llama.cpp`: llama.cpp (llama-cpp-python) on the same GGUF, same prompt ids,
same thread count, greedy without early stop, measured in the same run.

llama.cpp runs in a child process (`python -m llminfer.cli.llama_cpp_peer`, a JSON job on stdin, JSON timings on
stdout): its OpenMP runtime and PyTorch's in one process have crashed. It decodes one sequence at a time, so a
batch of prompts is run one prompt after another (as the lite runtime's bench does).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from llminfer.errors import LLMInferError

INSTALL_HINT = ("--compare llama.cpp needs llama-cpp-python (an optional extra, not part of the test install): "
                "pip install -e '.[bench]' builds llama.cpp from source (about 15 minutes on 2 cores; "
                "CMAKE_ARGS=\"-DGGML_NATIVE=ON\" for this CPU's instruction sets)")


def check_available() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise LLMInferError(INSTALL_HINT)


def requantized_gguf(source: str, type_name: str, log: Callable[[str], None],
                     embedding_type: str | None = None) -> str:
    """The same weights as GGUF `source` with every matrix in llama.cpp's `type_name` (the token embedding, which a
    tied LM head reads whole, in `embedding_type` if given, as llama.cpp's quantizer keeps it in Q8_0 beside Q4_1):
    Q8_0 beside a Q4_1 file is int8 against our int8 weights, which come from the same dequantized values; Q4_1 or
    Q8_0 from a float16 file (bench's random-llama-1b) is what llama.cpp runs against our int4 or int8 weights.
    Matrices are dequantized and quantized again with the `gguf` package's quantizers, metadata and 1-D tensors
    copied. `source` itself when it already holds those types; otherwise written once, beside it (through a
    temporary file, so a stopped run leaves nothing half-written)."""
    import gguf
    import numpy as np

    path = Path(source)
    reader = gguf.GGUFReader(path)

    def wanted(tensor) -> gguf.GGMLQuantizationType:
        name = embedding_type if tensor.name == "token_embd.weight" and embedding_type else type_name
        return gguf.GGMLQuantizationType[name]

    matrices = [tensor for tensor in reader.tensors if len(tensor.shape) == 2]
    if all(tensor.tensor_type == wanted(tensor) for tensor in matrices):
        return source
    target = path.with_name(f"{path.stem}.as-{type_name}.gguf")
    if target.is_file():
        return str(target)
    log(f"llama.cpp: writing {target.name} (the weights of {path.name} as {type_name}) ...")
    partial = target.with_name(target.name + f".{os.getpid()}.partial")
    writer = gguf.GGUFWriter(partial, reader.fields["general.architecture"].contents())
    try:
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue  # the writer's own
            array = field.types[0] == gguf.GGUFValueType.ARRAY
            writer.add_key_value(field.name, field.contents(), field.types[0],
                                 sub_type=field.types[-1] if array else None)
        for i, tensor in enumerate(reader.tensors):
            qtype = wanted(tensor)
            if len(tensor.shape) != 2 or tensor.tensor_type == qtype:
                writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
                continue
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # numpy order [..., ne0]
            writer.add_tensor(tensor.name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
            if (i + 1) % 20 == 0:
                log(f"llama.cpp: {i + 1}/{len(reader.tensors)} tensors quantized")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return str(target)


def peer_environment() -> dict[str, str]:
    """The environment as the user gave it: without the OpenMP spin count llminfer sets for itself (llminfer/__init__),
    which llama.cpp's own OpenMP threads would otherwise read."""
    import llminfer

    env = {**os.environ, "LLMINFER_OMP_DEFAULTS": "keep"}
    if llminfer.spin_count_defaulted:
        env.pop("GOMP_SPINCOUNT", None)
    return env


def measure(gguf: str, prompts: list[list[int]], output_len: int, iters: int, threads: int,
            log: Callable[[str], None]) -> tuple[list[tuple[float, float]], list[list[int]]]:
    """(ttft seconds, decode seconds) per timed run (after one warm-up), and the greedy tokens of the last run."""
    check_available()
    job = {"gguf": gguf, "prompts": prompts, "output_len": output_len, "iters": iters, "threads": threads}
    log(f"llama.cpp: {gguf}, {threads} threads, {iters} runs (in a child process)")
    done = subprocess.run([sys.executable, "-m", "llminfer.cli.llama_cpp_peer"], input=json.dumps(job),
                          capture_output=True, text=True, env=peer_environment())
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
