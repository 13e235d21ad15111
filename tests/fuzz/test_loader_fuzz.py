"""Fuzzed model files: GGUF headers, safetensors headers, config.json values, tokenizer files and chat templates.
Every case must end in our typed one-line error or a clean load, within a time bound, in a worker process whose
address space is capped (an allocation the checks missed is a MemoryError there: a crash, a failed test).

CI runs a fixed-seed slice (LLMINFER_FUZZ_EXAMPLES, default 25 per file kind); a longer run:
    LLMINFER_FUZZ_EXAMPLES=2000 pytest tests/fuzz -p no:cacheprovider
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import make_hf_model
from gguf import GGMLQuantizationType as Q
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gguf import write_gguf

EXAMPLES = int(os.environ.get("LLMINFER_FUZZ_EXAMPLES", "25"))
SECONDS_PER_CASE = 30.0
ADDRESS_SPACE = 4 * 2**30
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="LLMINFER_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=list(HealthCheck), database=None)
WORKER = Path(__file__).parent.parent / "helpers" / "load_worker.py"
REPORT: dict[str, dict] = {}  # per kind: cases, outcomes, peak RSS (printed at the end of the module)


class LoadWorker:
    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, str(WORKER), str(ADDRESS_SPACE)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def load(self, path: Path) -> dict:
        self.process.stdin.write(f"{path}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the load worker died on {path} (killed for memory, or a crash outside Python)"
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


@pytest.fixture(scope="module")
def worker():
    process = LoadWorker()
    yield process
    process.close()
    for kind, report in REPORT.items():
        print(f"\nfuzz {kind}: {report}")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, tiny_chat_folder) -> dict[str, bytes | Path]:
    folder = tmp_path_factory.mktemp("fuzz-base")
    gguf = folder / "tiny.gguf"
    write_gguf(make_hf_model("llama"), gguf, Q.F32)
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    # where the tensor records start (after the metadata) and where the data starts: both parts are fuzzed
    tensor_records = min(int(t.field.offset) for t in reader.tensors) if reader.tensors else 24
    return {"gguf": gguf.read_bytes(), "gguf_regions": (24, tensor_records, reader.data_offset),
            "folder": tiny_chat_folder}


def check(worker: LoadWorker, kind: str, path: Path) -> None:
    result = worker.load(path)
    report = REPORT.setdefault(kind, {"cases": 0, "loaded": 0, "refused": 0, "crashed": 0, "peak_rss_mb": 0})
    report["cases"] += 1
    report[result["outcome"]] += 1
    report["peak_rss_mb"] = max(report["peak_rss_mb"], round(result["peak_rss_mb"]))
    assert result["outcome"] != "crashed", result["message"]
    assert result["seconds"] < SECONDS_PER_CASE, result
    if result["outcome"] == "refused":
        assert "\n" not in result["message"] and "Traceback" not in result["message"], result["message"]


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="llminfer-fuzz-"))


SPECIAL_INTEGERS = st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1])
WORDS = st.one_of(SPECIAL_INTEGERS, st.integers(0, 2**64 - 1))


@FUZZ
@given(data=st.data())
def test_fuzzed_gguf_headers(worker, tiny_files, data):
    content = bytearray(tiny_files["gguf"])
    counts_end, tensor_records, data_start = tiny_files["gguf_regions"]
    regions = [(0, counts_end), (counts_end, tensor_records), (tensor_records, data_start)]  # counts, kv, tensors
    for _ in range(data.draw(st.integers(0, 6))):  # none: the file as written loads (both outcomes are reached)
        start, end = data.draw(st.sampled_from(regions))
        at = data.draw(st.integers(start, end - 8))
        width = data.draw(st.sampled_from([1, 4, 8]))
        value = data.draw(WORDS) % (2 ** (8 * width))
        content[at:at + width] = value.to_bytes(width, "little")
    if data.draw(st.booleans()):
        content = content[:data.draw(st.integers(0, len(content)))]
    path = scratch() / "model.gguf"
    path.write_bytes(bytes(content))
    check(worker, "gguf", path)
    shutil.rmtree(path.parent)


DTYPES = st.sampled_from(["F32", "F16", "BF16", "I32", "I8", "U8", "F64", "BOOL", "F8_E4M3", "XYZ", ""])
DIMS = st.lists(st.one_of(st.integers(-2, 400), SPECIAL_INTEGERS), max_size=5)


@FUZZ
@given(data=st.data())
def test_fuzzed_safetensors_headers(worker, tiny_files, data):
    folder = scratch() / "model"
    shutil.copytree(tiny_files["folder"], folder)
    file = folder / "model.safetensors"
    raw = file.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header, payload = json.loads(raw[8:8 + length]), raw[8 + length:]
    names = [n for n in header if n != "__metadata__"]
    for name in data.draw(st.lists(st.sampled_from(names), max_size=4, unique=True)):
        entry = header[name]
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop"]))
        if field == "dtype":
            entry["dtype"] = data.draw(DTYPES)
        elif field == "shape":
            entry["shape"] = data.draw(DIMS)
        elif field == "data_offsets":
            entry["data_offsets"] = [data.draw(st.integers(-1, 2**40)), data.draw(st.integers(-1, 2**40))]
        else:
            header.pop(name, None)
    encoded = json.dumps(header).encode()
    declared = data.draw(st.one_of(st.just(len(encoded)), WORDS))
    file.write_bytes(struct.pack("<Q", declared) + encoded + payload)
    check(worker, "safetensors", folder)
    shutil.rmtree(folder.parent)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), WORDS.map(lambda v: v - 2**63), st.integers(-5, 5),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children,
                                                                                 max_size=4)),
    max_leaves=12)


@FUZZ
@given(data=st.data())
def test_fuzzed_config_values(worker, tiny_files, data):
    folder = scratch() / "model"
    shutil.copytree(tiny_files["folder"], folder)
    config = json.loads((folder / "config.json").read_text())
    for key in data.draw(st.lists(st.sampled_from(sorted(config)), min_size=1, max_size=4)):
        config[key] = data.draw(JSON_VALUES)
    depth = data.draw(st.sampled_from([0, 0, 0, 50_000]))
    text = json.dumps(config, allow_nan=True)
    (folder / "config.json").write_text("[" * depth + text + "]" * depth if depth else text)
    check(worker, "config.json", folder)
    shutil.rmtree(folder.parent)


TEMPLATE_PIECES = st.sampled_from([
    "{{ messages[0].content }}", "{% for m in messages %}{{ m.role }}{% endfor %}", "{{ 'a' * 1000000000 }}",
    "{{ 'ab' * 7 }}", "{% set ns = namespace(x='a') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}"
    "{% endfor %}", "{{ ''.__class__ }}", "{{ range(10**9)|list }}", "{{ 'x'|center(10**9) }}", "{% if %}",
    "{{ raise_exception('no') }}", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{{ '{:>9999999999}'.format(1) }}",
    "{{ bos_token }}", "{{ messages|tojson }}", "{%", "}}", "<|im_start|>", "\n",
])


@FUZZ
@given(data=st.data())
def test_fuzzed_tokenizer_files_and_chat_templates(worker, tiny_files, data):
    folder = scratch() / "model"
    shutil.copytree(tiny_files["folder"], folder)
    template = "".join(data.draw(st.lists(TEMPLATE_PIECES, min_size=1, max_size=6)))
    tokenizer_config = {"eos_token": data.draw(st.one_of(st.just("<|im_end|>"), JSON_VALUES)),
                        "chat_template": data.draw(st.one_of(st.just(template), JSON_VALUES))}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if data.draw(st.booleans()):  # a damaged tokenizer.json
        tokenizer = (folder / "tokenizer.json").read_text()
        cut = data.draw(st.integers(0, len(tokenizer)))
        (folder / "tokenizer.json").write_text(tokenizer[:cut] + data.draw(st.text(max_size=20)))
    check(worker, "tokenizer", folder)
    shutil.rmtree(folder.parent)


def test_the_fuzzers_reached_both_outcomes():
    """A fuzzer whose every case is refused at the magic bytes tests nothing: each kind must have loaded some
    cases and refused others (runs after the fuzz tests in this module)."""
    for kind in ("gguf", "safetensors", "config.json", "tokenizer"):
        report = REPORT.get(kind)
        assert report and report["cases"] >= min(EXAMPLES, 10), (kind, report)
        assert report["refused"] > 0 and report["loaded"] > 0, (kind, report)
    assert math.isfinite(max(r["peak_rss_mb"] for r in REPORT.values()))
