"""Run under torchrun (or llminfer's launcher env): greedy token ids of a few prompts, printed by rank 0 as JSON."""

import json
import sys

from llminfer import LLM, SamplingParams

folder, prompts = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(folder, tensor_parallel_size=int(sys.argv[3]), kv_cache_memory="8MiB")  # other ranks exit inside
outputs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
print(json.dumps([o.outputs[0].token_ids for o in outputs]))
