"""Mask time per token of llguidance (our backend) and xgrammar on SmolLM2's vocabulary, one mask at a time,
walking an instance of bench throughput's built-in JSON schema (docs/STRUCTURED_OUTPUTS.md).

xgrammar is not a dependency: pip install --no-deps --target /tmp/xgpkgs xgrammar apache-tvm-ffi, then
PYTHONPATH=/tmp/xgpkgs python tools/grammar_mask_timing.py
"""

from __future__ import annotations

import json
import time

import llguidance.torch as llguidance_torch
import xgrammar
from transformers import PreTrainedTokenizerFast

from llminfer.cli.bench import BENCH_SCHEMA
from llminfer.engine.structured import GrammarCompiler, StructuredOutput
from llminfer.loading.resolve import open_checkpoint

VOCAB = 49152


def report(name: str, seconds: list[float]) -> None:
    ordered = sorted(seconds)
    print(f"{name}: mask per token mean {1e3 * sum(seconds) / len(seconds):.3f} ms, median "
          f"{1e3 * ordered[len(ordered) // 2]:.3f} ms, max {1e3 * ordered[-1]:.3f} ms over {len(seconds)} tokens")


def main() -> None:
    tokenizer = open_checkpoint("smollm2-135m").tokenizer()
    instance = {"title": "Quarterly results", "kind": "report", "score": 4.5, "tags": ["a", "finance"],
                "items": [{"name": f"item{i}", "count": i} for i in range(30)]}
    ids = tokenizer.encode(json.dumps(instance, separators=(", ", ": "))[:-2], add_special_tokens=False)

    started = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(
        PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token="<|im_end|>"), vocab_size=VOCAB)
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(BENCH_SCHEMA), any_whitespace=False,
                                                                  separators=(", ", ": "))
    print(f"xgrammar: vocabulary and grammar compiled in {time.perf_counter() - started:.2f} s")
    matcher, bitmask, seconds = xgrammar.GrammarMatcher(compiled), xgrammar.allocate_token_bitmask(1, VOCAB), []
    for token in ids:
        started = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        seconds.append(time.perf_counter() - started)
        assert matcher.accept_token(token)
    report("xgrammar", seconds)

    started = time.perf_counter()
    ours = GrammarCompiler.for_tokenizer(tokenizer, VOCAB, [2]).matcher(StructuredOutput(json=BENCH_SCHEMA))
    print(f"llguidance: vocabulary and grammar compiled in {time.perf_counter() - started:.2f} s")
    bitmask, seconds = llguidance_torch.allocate_token_bitmask(1, VOCAB), []
    for token in ids:
        started = time.perf_counter()
        llguidance_torch.fill_next_token_bitmask(ours.matcher, bitmask)
        seconds.append(time.perf_counter() - started)
        assert ours.accept(token)
    report("llguidance", seconds)


if __name__ == "__main__":
    main()
