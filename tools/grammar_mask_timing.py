"""Mask time per token of llguidance (our backend) and xgrammar on SmolLM2's vocabulary, one mask at a time,
walking an instance of bench throughput's built-in JSON schema (docs/STRUCTURED_OUTPUTS.md).

xgrammar is not a dependency: pip install --no-deps --target /tmp/xgpkgs xgrammar apache-tvm-ffi, then
PYTHONPATH=/tmp/xgpkgs python tools/grammar_mask_timing.py
"""
import time, json, torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerFast
from llminfer.loading.resolve import open_checkpoint
from llminfer.engine.structured import GrammarCompiler, StructuredOutput, unpack_bitmask
from llminfer.cli.bench import BENCH_SCHEMA
ck = open_checkpoint("smollm2-135m"); tok = ck.tokenizer()
hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token="<|im_end|>")
t=time.perf_counter(); info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=49152); comp = xgr.GrammarCompiler(info)
cg = comp.compile_json_schema(json.dumps(BENCH_SCHEMA), any_whitespace=False, separators=(", ", ": ")); print("xgrammar setup+compile s", time.perf_counter()-t)
# a realistic instance text to walk
inst = {"title": "Quarterly results", "kind": "report", "score": 4.5, "tags": ["a", "finance"], "items": [{"name": f"item{i}", "count": i} for i in range(30)]}
text = json.dumps(inst, separators=(", ", ": "))[:-2]
ids = tok.encode(text, add_special_tokens=False)
m = xgr.GrammarMatcher(cg); bm = xgr.allocate_token_bitmask(1, 49152)
ts=[]
for i in ids:
    t=time.perf_counter(); m.fill_next_token_bitmask(bm); ts.append(time.perf_counter()-t)
    assert m.accept_token(i), i
print("xgrammar mask ms/token mean %.3f p50 %.3f max %.3f over %d" % (1e3*sum(ts)/len(ts), 1e3*sorted(ts)[len(ts)//2], 1e3*max(ts), len(ts)))
c = GrammarCompiler.for_tokenizer(tok, 49152, [2]); t=time.perf_counter(); g=c.matcher(StructuredOutput(json=BENCH_SCHEMA)); print("llguidance setup+compile s", time.perf_counter()-t)
import llguidance.torch as lt
mask = lt.allocate_token_bitmask(1, 49152); ts=[]
for i in ids:
    t=time.perf_counter(); lt.fill_next_token_bitmask(g.matcher, mask); ts.append(time.perf_counter()-t)
    assert g.accept(i), i
print("llguidance mask ms/token mean %.3f p50 %.3f max %.3f over %d" % (1e3*sum(ts)/len(ts), 1e3*sorted(ts)[len(ts)//2], 1e3*max(ts), len(ts)))
