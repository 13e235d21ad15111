"""lm-evaluation-harness against `llminfer serve`, as users run it: `lm_eval --model local-completions` with
the server's remote tokenizer, on two small tasks whose data are local JSONL files (no hub access), one scored by
loglikelihood (multiple choice: echo + logprobs) and one generated (generate_until). The loglikelihoods it
reports must be transformers' on the same text and tokens (relative 1e-4, float32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llminfer import LLM, SamplingParams

pytest.importorskip("lm_eval")

QUESTIONS = [
    {"question": "The for statement is used to", "choices": [" iterate over a sequence", " define a class",
                                                             " raise an error"], "answer": 0},
    {"question": "A tuple is", "choices": [" mutable", " immutable"], "answer": 1},
    {"question": "Dictionaries map keys to", "choices": [" values", " classes", " modules", " loops"], "answer": 0},
]
CHOICE_TASK = """task: llminfer_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
GENERATE_TASK = """task: llminfer_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def live(tiny_chat_folder):
    from test_server import LiveServer

    server = LiveServer(LLM(str(tiny_chat_folder)))
    yield server
    server.close()


def run_lm_eval(url: str, tasks_dir: Path, output: Path, tasks: list[str]) -> dict[str, list[dict]]:
    """One lm_eval run over the tasks; each task's logged samples."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
               f"base_url={url}/v1/completions,model=tiny,tokenizer_backend=remote,num_concurrent=1,max_retries=1",
               "--tasks", ",".join(tasks), "--include_path", str(tasks_dir), "--output_path", str(output),
               "--log_samples"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = {}
    for task in tasks:
        [log] = list(output.rglob(f"samples_{task}_*.jsonl"))
        samples[task] = [json.loads(line) for line in log.read_text().splitlines()]
    return samples


def continuation_logprob(hf, tokenizer, context: str, continuation: str) -> float:
    """What lm-eval asks for, computed by transformers: its own split of context and continuation tokens
    (trailing spaces of the context move to the continuation; the continuation is what the whole adds)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    with torch.no_grad():
        logprobs = hf(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context_ids), len(whole)))


def test_lm_eval_loglikelihood_and_generate_until_through_local_completions(live, tiny_chat_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "choice.yaml").write_text(CHOICE_TASK.format(data=data))
    (tasks / "generate.yaml").write_text(GENERATE_TASK.format(data=data))

    logged = run_lm_eval(live.url, tasks, tmp_path / "out", ["llminfer_choice", "llminfer_generate"])
    samples, generated = logged["llminfer_choice"], logged["llminfer_generate"]
    hf = AutoModelForCausalLM.from_pretrained(tiny_chat_folder, dtype=torch.float32).eval()
    tokenizer = live.state.tokenizer
    scored = 0
    for sample in samples:
        # the samples log: arguments {"gen_args_i": {"arg_0": context, "arg_1": continuation}}, resps as strings
        for arguments, response in zip(sample["arguments"].values(), sample["resps"]):
            context, continuation = arguments["arg_0"], arguments["arg_1"]
            logprob = float(response[0][0])
            expected = continuation_logprob(hf, tokenizer, context, continuation)
            assert logprob == pytest.approx(expected, rel=1e-4), (context, continuation)
            scored += 1
    assert len(samples) == len(QUESTIONS) and scored == sum(len(q["choices"]) for q in QUESTIONS)

    assert len(generated) == len(QUESTIONS)
    oracle = LLM(str(tiny_chat_folder))
    for sample in generated:
        [arguments] = sample["arguments"].values()
        context = arguments["arg_0"]
        expected = oracle.generate(context, SamplingParams(max_tokens=6, temperature=0))[0].text.split("\n")[0]
        assert sample["resps"][0][0] == expected
