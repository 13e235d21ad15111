"""`LLM`: the engine-style Python API. Load once, then generate for many prompts."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace
from typing import Any, Iterator, Sequence

import torch

from llminfer.config import EngineConfig
from llminfer.engine.llm_engine import LLMEngine
from llminfer.engine.outputs import RequestOutput
from llminfer.engine.sampling_params import SamplingParams
from llminfer.errors import InvalidSamplingParamsError, TokenizerError
from llminfer.kv_cache import KVCacheStats
from llminfer.loading import open_checkpoint
from llminfer.loading.default_models import DEFAULT_MODEL
from llminfer.model.auto import load_model, load_time_quantization
from llminfer.ops import parse_ops_spec, resolve_ops
from llminfer.parallel.sharding import ShardPlan

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]
Messages = list[dict[str, Any]]


class LLM:
    """LLM("smollm2-135m").generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))"""

    def __init__(self, model: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "cpu",
                 max_model_len: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 kv_cache_memory: int | float | str | None = None, block_size: int = 16,
                 enable_prefix_caching: bool = True, kv_cache_dtype: str = "auto",
                 quantization: str | None = None, tensor_parallel_size: int = 1,
                 ops: str | dict[str, str] | None = None, threads: int | None = None,
                 enforce_eager: bool = False) -> None:
        """dtype 'auto': float32, or bfloat16 for a quantized model. kv_cache_dtype 'int8' stores keys and values
        as int8. quantization (a16w8 | a16w4 | a8w8) quantizes a float checkpoint at load time.
        tensor_parallel_size N: this process is one of N ranks started by `llminfer ... --tensor-parallel-size N`
        or torchrun; ranks other than 0 serve rank 0's steps inside this constructor and then exit.
        ops: which implementation each op uses, 'rms_norm=reference,paged_decode_attention=batched' or a dict
        (default: the best available on the device; `llminfer info --ops` lists them). threads: CPU threads
        (default: the cores this process may run on; split among tensor-parallel ranks on one machine); torch's
        thread count is process-wide, so this sets it for the process. enforce_eager: run every step through the
        Python network (by default decode steps on the CPU are recorded once per batch size and replayed from C++)."""
        self.config = EngineConfig(dtype=dtype, device=device, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens, kv_cache_memory=kv_cache_memory,
                                   block_size=block_size, enable_prefix_caching=enable_prefix_caching,
                                   kv_cache_dtype=kv_cache_dtype, quantization=quantization,
                                   ops=parse_ops_spec(ops), threads=threads, enforce_eager=enforce_eager)
        checkpoint = open_checkpoint(model)
        self.model_name = model
        self.checkpoint_format = checkpoint.format
        self.model_config = checkpoint.config
        self.sampling_defaults = checkpoint.sampling_defaults()  # the model's own (generation_config.json)
        rank, world = _parallel_rank(tensor_parallel_size, device)
        torch.set_num_threads(self.config.cpu_threads(_local_processes(world)))
        self.tensor_parallel_size = world
        plan = collectives = None
        if world > 1:
            from llminfer.parallel.communication import TorchCollectives

            plan = ShardPlan(checkpoint.config, rank, world, load_time_quantization(checkpoint, quantization))
            collectives = TorchCollectives(world)
        self.model = load_model(checkpoint, dtype, device, quantization, plan, resolve_ops(self.config.ops, device),
                                collectives, max_model_len=max_model_len)
        self.config = replace(self.config, dtype=str(self.model.dtype).replace("torch.", ""))
        self.tokenizer = self.model.tokenizer
        if rank > 0:
            _serve_rank(self.model, self.config)
        identity = f"{checkpoint.name}|{self.config.dtype}|{self.model.quantization and self.model.quantization.scheme}"
        self.engine = LLMEngine(self.model, self.tokenizer, self.config, model_identity=identity)
        if world > 1:
            from llminfer.engine.distributed import BroadcastingRunner, share_cache_shape

            share_cache_shape(self.engine.cache.num_blocks)
            self.engine.runner = BroadcastingRunner(self.model, self.engine.cache, self.engine.runner.backend)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """One output per prompt, in the order given. A prompt is text or a list of token ids; params is one
        SamplingParams for all prompts or one per prompt. A request that fails alone (non-finite logits)
        comes back with finish_reason "error" and `.error` saying why; the others are unaffected."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidSamplingParamsError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        requests = []
        try:
            for prompt, p in zip(prompts, params):
                requests.append(self.engine.add_request(prompt, p))
            by_id = {o.request_id: o for o in self.engine.run_to_completion()}
        except BaseException:
            # All or nothing: a bad prompt, a failed step or Ctrl-C leaves none of this batch queued, so the
            # next call starts from a clean engine.
            for request in requests:
                self.engine.abort(request.group_id)
            raise
        return [by_id[r.group_id] for r in requests]

    def chat(self, messages: Messages | Sequence[Messages],
             params: SamplingParams | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self.generate([self.chat_prompt(c) for c in conversations], params)

    def chat_prompt(self, messages: Messages) -> list[int]:
        if self.tokenizer is None:
            raise TokenizerError(f"{self.model_name}: has no tokenizer, so no chat template")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that advanced it; `.delta` holds the new text.
        Closing the iterator early aborts the request."""
        request = self.engine.add_request(prompt, params or SamplingParams())
        finished = False
        try:
            while not finished:
                for output in self.engine.step():
                    if output.request_id == request.group_id:
                        finished = output.finished
                        yield output
        finally:
            if not finished:
                self.engine.abort(request.group_id)

    def kv_cache_stats(self) -> KVCacheStats:
        """Blocks total / free / in use (and the peak), prefix-cache hit and queried tokens."""
        return self.engine.kv_cache_stats()


def _local_processes(world: int) -> int:
    """How many ranks of this run share this machine's cores."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world)) if world > 1 else 1


def _parallel_rank(tensor_parallel_size: int, device: str) -> tuple[int, int]:
    from llminfer.engine.distributed import distributed_env, init_distributed
    from llminfer.errors import ConfigError

    _, world = distributed_env()
    if tensor_parallel_size > 1 and world != tensor_parallel_size:
        raise ConfigError(f"tensor_parallel_size={tensor_parallel_size} needs {tensor_parallel_size} processes: start "
                          f"them with `llminfer ... --tensor-parallel-size {tensor_parallel_size}` or `torchrun "
                          f"--nproc-per-node {tensor_parallel_size} -m llminfer ...` (found WORLD_SIZE={world})")
    return init_distributed(device) if world > 1 else (0, 1)


def _serve_rank(model, config: EngineConfig) -> None:
    """Ranks other than 0: allocate the same number of KV blocks as rank 0, follow its steps, then exit."""
    from llminfer.engine.distributed import follow, leave_process_group, share_cache_shape
    from llminfer.engine.llm_engine import resolve_kv_cache_dtype
    from llminfer.engine.model_runner import ModelRunner
    from llminfer.kv_cache import PagedKVCache, attention_backend

    cfg = model.config
    num_blocks = share_cache_shape(None)
    cache = PagedKVCache(cfg.num_hidden_layers, num_blocks, config.block_size, cfg.num_key_value_heads, cfg.head_dim,
                         model.dtype, model.device, resolve_kv_cache_dtype(config, model))
    follow(ModelRunner(model, cache, attention_backend(config.attention_backend, cache, model.ops)))
    leave_process_group()
    # Skip interpreter teardown: gloo's and the thread pools' static destructors have aborted a follower that
    # had finished cleanly. Nothing of this rank's is left to flush but its streams.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
