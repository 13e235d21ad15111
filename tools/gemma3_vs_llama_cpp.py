"""Gemma 3 270M (Q4_K_M GGUF): llminfer against llama.cpp (llama-cpp-python 0.3.36) on the same file.

    pip install llama-cpp-python==0.3.36   # builds llama.cpp; not part of the test install
    python tools/gemma3_vs_llama_cpp.py [--peer-python PYTHON] [--max-tokens 4096] [--context-len 512]

llama.cpp runs in its own process (`--peer-python`: an interpreter that has llama_cpp; default this one): its
OpenMP and PyTorch's in one process have crashed. Prints whether both tokenize pydoc_data.topics identically,
the greedy continuation of "The capital of France is" from each, and the perplexity of each over the same
windows (llminfer's token ids, no BOS, every token but a window's first scored, as `llminfer perplexity` does).
"""

import argparse
import json
import subprocess
import sys
import tempfile

from llminfer import LLM, SamplingParams
from llminfer.loading import open_checkpoint
from llminfer.perplexity import default_text, perplexity

PROMPT = "The capital of France is"

PEER = r'''
import json, math, sys
import numpy as np
from llama_cpp import Llama

job = json.load(open(sys.argv[1]))
model = Llama(job["path"], n_ctx=job["context_len"], n_batch=job["context_len"], logits_all=True, verbose=False)
tokens = model.tokenize(job["text"].encode("utf-8"), add_bos=False, special=False)
text = model.create_completion(job["prompt"], max_tokens=24, temperature=0.0)["choices"][0]["text"]
total, scored = 0.0, 0
for window in job["windows"]:
    model.reset()
    model.eval(window)
    logits = np.asarray(model.scores[:len(window)], dtype=np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    total -= sum(logprobs[i, window[i + 1]] for i in range(len(window) - 1))
    scored += len(window) - 1
print(json.dumps({"tokens": tokens, "text": text, "perplexity": math.exp(total / scored)}))
'''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer-python", default=sys.executable)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--context-len", type=int, default=512)
    args = parser.parse_args()
    path = str(open_checkpoint("gemma3-270m").path)
    llm = LLM(path, enable_prefix_caching=False, max_num_batched_tokens=2048)
    text = default_text()
    ours = llm.tokenizer.encode(text, add_special_tokens=False)
    ids = ours[:args.max_tokens]
    windows = [w for w in (ids[i:i + args.context_len] for i in range(0, len(ids), args.context_len)) if len(w) >= 2]
    with tempfile.NamedTemporaryFile("w", suffix=".json") as job:
        json.dump({"path": path, "text": text, "prompt": PROMPT, "windows": windows,
                   "context_len": args.context_len}, job)
        job.flush()
        peer = json.loads(subprocess.run([args.peer_python, "-c", PEER, job.name], check=True,
                                         capture_output=True, text=True).stdout)
    first = next((i for i, (a, b) in enumerate(zip(ours, peer["tokens"])) if a != b), None)
    print(f"tokenization of pydoc_data.topics: {len(ours)} vs {len(peer['tokens'])} tokens, "
          + ("identical" if ours == peer["tokens"] else f"first difference at token {first}"))
    ours_text = llm.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0.0))[0].outputs[0].text
    print(f"greedy 24 tokens, llminfer : {ours_text!r}")
    print(f"greedy 24 tokens, llama.cpp: {peer['text']!r}  ({'same' if ours_text == peer['text'] else 'different'})")
    mine = perplexity(llm.model, ids, args.context_len, engine=llm.engine).perplexity
    print(f"perplexity over {len(windows)} windows of {args.context_len}: llminfer {mine:.4f}, "
          f"llama.cpp {peer['perplexity']:.4f}")


if __name__ == "__main__":
    main()
