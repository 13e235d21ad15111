"""Run under torchrun (or llminfer's launcher env): greedy token ids of a few prompts, printed by rank 0 as JSON."""

import json
import sys

from llminfer import LLM, SamplingParams

folder, prompts = sys.argv[1], json.loads(sys.argv[2])
quantization = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else None  # a scheme applied at load
dtype = sys.argv[5] if len(sys.argv) > 5 else "auto"
llm = LLM(folder, tensor_parallel_size=int(sys.argv[3]), kv_cache_memory="8MiB", quantization=quantization,
          dtype=dtype)  # other ranks exit inside
outputs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
print(json.dumps([o.outputs[0].token_ids for o in outputs]))
