"""The engine loop: requests are added (or aborted) at any time; each `step()` schedules, runs the
model, samples, and reports what changed."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import replace
from typing import Sequence

import torch

from llminfer.config import EngineConfig
from llminfer.engine.model_runner import ModelRunner
from llminfer.engine.outputs import RequestOutput
from llminfer.engine.request import Request
from llminfer.engine.sampling_params import SamplingParams
from llminfer.engine.scheduler import Scheduler
from llminfer.engine.step_graph import DecodeGraphs
from llminfer.engine.structured import GrammarCompiler, MaskWorker
from llminfer.errors import ConfigError, InvalidPromptError, InvalidSamplingParamsError, PromptTooLongError
from llminfer.kv_cache import KVCacheManager, KVCacheStats, PagedKVCache, attention_backend
from llminfer.model.base import CausalLM
from llminfer.tokenizer import IncrementalDetokenizer, Tokenizer
from llminfer.tokenizer.text_stream import TextStream

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None, config: EngineConfig,
                 extra_stop_token_ids: Sequence[int] = (), model_identity: str = "") -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        model_len = model.config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or model_len, model_len)
        stop_ids = set(model.config.eos_token_id) | set(extra_stop_token_ids)
        if tokenizer is not None:
            stop_ids |= tokenizer.stop_token_ids
        self.eos_token_ids = frozenset(stop_ids)
        cfg = model.config
        self.kv_cache_dtype = resolve_kv_cache_dtype(config, model)
        num_blocks = self._num_kv_blocks()
        self.cache = PagedKVCache(cfg.num_hidden_layers, num_blocks, config.block_size, cfg.num_key_value_heads,
                                  cfg.head_dim, model.dtype, model.device, self.kv_cache_dtype)
        # Prefix-cache hashes are keyed by what produced the KV: the model and how the KV is stored.
        self.kv = KVCacheManager(num_blocks, config.block_size, f"{model_identity or repr(cfg)}|{self.kv_cache_dtype}",
                                 config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len,
                                   self._fork_sample, config.scheduling_policy)
        backend = attention_backend(config.attention_backend, self.cache, model.ops)
        self.grammars = (GrammarCompiler.for_tokenizer(tokenizer, cfg.vocab_size, self.eos_token_ids)
                         if tokenizer is not None else None)
        self.runner = ModelRunner(model, self.cache, backend, self._step_graphs(backend), MaskWorker(cfg.vocab_size))
        self._groups: dict[str, list[Request]] = {}
        self._ids = itertools.count()

    def _step_graphs(self, backend) -> DecodeGraphs | None:
        if self.config.enforce_eager:
            return None
        reason = DecodeGraphs.usable(self.model, backend)
        if reason is not None:
            logger.info("decode steps run eagerly: %s", reason)
            return None
        return DecodeGraphs(self.model, self.cache, backend, self.max_model_len, self.config.max_graph_batch_size)

    def warm_up(self) -> None:
        """Record the decode-step graphs of every batch size now rather than at their first use (2 s each on a
        small CPU); for servers, before they take requests. No-op when steps run eagerly."""
        graphs = self.runner.step_graphs
        if graphs is None or self.has_unfinished_requests():
            return
        started = time.perf_counter()
        count = graphs.record_all(self.config.max_num_seqs)
        logger.info("recorded %d decode-step graphs in %.1f s", count, time.perf_counter() - started)

    def _num_kv_blocks(self) -> int:
        config = self.config
        per_block = kv_block_bytes(config, self.model)
        budget = config.kv_cache_bytes()
        # More than max_num_seqs full contexts could never be used.
        useful = config.max_num_seqs * -(-self.max_model_len // config.block_size)
        blocks = min(budget // per_block, useful)
        if blocks < 1:
            raise ConfigError(f"kv_cache_memory of {budget} bytes holds no KV block ({per_block} bytes each)")
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB, %s)", blocks, config.block_size,
                    blocks * per_block / 2**20, resolve_kv_cache_dtype(config, self.model))
        return blocks

    # --- requests -----------------------------------------------------------------------------

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams,
                    request_id: str | None = None) -> Request:
        """Queue a prompt; returns its first sample (the others are forked once the prompt is computed)."""
        prompt_text, prompt_ids = self._tokenize(prompt)
        self.check_request(prompt_ids, params)
        group_id = request_id or str(next(self._ids))
        if group_id in self._groups:
            raise InvalidPromptError(f"request id '{group_id}' is already in use")
        request = self._new_sample(group_id, 0, prompt_text, prompt_ids, params)
        request.pending_forks = params.n - 1
        self._groups[group_id] = [request]
        self.scheduler.add(request)
        return request

    def _tokenize(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidPromptError("this model has no tokenizer: pass token ids, not text")
            return prompt, self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.model.config.vocab_size]
        if bad:
            raise InvalidPromptError(f"prompt token id {bad[0]} is outside the vocabulary "
                                     f"[0, {self.model.config.vocab_size})")
        return None, ids

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: the model's vocabulary, context and KV pool."""
        vocab = self.model.config.vocab_size
        if params.top_k > vocab:
            raise InvalidSamplingParamsError(f"invalid sampling parameter top_k={params.top_k}: expected at most the "
                                             f"vocabulary size {vocab} (or 0 / -1 for off)", field="top_k")
        if not prompt_ids:
            raise InvalidPromptError("prompt is empty: expected at least one token")
        if params.structured is not None:
            if self.grammars is None:
                raise InvalidSamplingParamsError("structured outputs need the model's tokenizer; this model has "
                                                 "none", field="structured")
            self.grammars.compile(params.structured)  # refuses what it cannot enforce, before anything is queued
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(prompt_ids)} tokens and max_tokens is {params.max_tokens}: {total} exceeds the "
                f"context of {self.max_model_len} tokens (max_model_len); shorten the prompt or lower max_tokens")
        blocks = self.kv.blocks_needed(total)
        if blocks > self.kv.pool.num_blocks:
            raise PromptTooLongError(f"request needs {blocks} KV blocks ({total} tokens) but the KV cache holds "
                                     f"{self.kv.pool.num_blocks}; raise kv_cache_memory or lower max_tokens")

    def _new_sample(self, group_id: str, index: int, prompt_text: str | None, prompt_ids: list[int],
                    params: SamplingParams) -> Request:
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        generator = None
        if params.seed is not None:  # sample i of a seeded request draws from seed + i
            generator = torch.Generator(device=self.model.device).manual_seed(params.seed + index)
        stream = None
        if self.tokenizer is not None:
            stream = TextStream(IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens),
                                params.stop)
        request_id = group_id if index == 0 else f"{group_id}#{index}"
        grammar = self.grammars.matcher(params.structured) if params.structured is not None else None
        return Request(request_id, group_id, prompt_text, prompt_ids, params, stop_ids, generator, stream,
                       sample_index=index, grammar=grammar)

    def abort(self, request_id: str) -> None:
        """Stop a request (all its samples) wherever it is; its KV blocks are freed at once."""
        for request in self._groups.pop(request_id, []):
            self.scheduler.abort(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work

    def kv_cache_stats(self) -> KVCacheStats:
        return self.kv.stats()

    # --- the loop -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One forward pass over the scheduled batch; an output for each request that advanced."""
        batch = self.scheduler.schedule()
        if not batch.requests:
            return []
        output = self.runner.execute_model(batch)
        self.scheduler.update_from_output(batch, output)
        touched = dict.fromkeys(r.group_id for r in batch.requests)
        return [self._group_output(group_id) for group_id in touched]

    def _fork_sample(self, parent: Request, index: int) -> Request:
        """Sample `index` of an n > 1 request (the scheduler decides when, and starts it from the parent)."""
        child = self._new_sample(parent.group_id, index, parent.prompt, parent.prompt_token_ids, parent.params)
        self._groups[parent.group_id].append(child)
        return child

    def _group_output(self, group_id: str) -> RequestOutput:
        samples = self._groups[group_id]
        first = samples[0]
        finished = all(r.is_finished for r in samples) and not first.pending_forks
        prompt_logprobs = None
        if first.params.prompt_logprobs is not None:
            prompt_logprobs = [None, *first.prompt_logprobs]
        output = RequestOutput(group_id, first.prompt, first.prompt_token_ids, [r.to_completion() for r in samples],
                               finished, prompt_logprobs)
        if finished:
            del self._groups[group_id]
        return output

    def run_to_completion(self) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for output in self.step():
                if output.finished:
                    finished[output.request_id] = output
        return list(finished.values())


def exact_kv_budget(config: EngineConfig, model: CausalLM, total_tokens: int, num_seqs: int) -> EngineConfig:
    """A config whose KV pool holds exactly num_seqs sequences of total_tokens (for one-off generate calls)."""
    blocks = num_seqs * -(-total_tokens // config.block_size)
    return replace(config, kv_cache_memory=blocks * kv_block_bytes(config, model), max_num_seqs=max(num_seqs, 1))


def resolve_kv_cache_dtype(config: EngineConfig, model: CausalLM) -> str:
    """'auto' follows a quantized checkpoint's recorded choice, else stores the model's dtype."""
    if config.kv_cache_dtype == "auto" and model.quantization is not None:
        return model.quantization.kv_cache_dtype
    return config.kv_cache_dtype


def kv_block_bytes(config: EngineConfig, model: CausalLM) -> int:
    cfg = model.config
    return PagedKVCache.bytes_per_block(cfg.num_hidden_layers, config.block_size, cfg.num_key_value_heads,
                                        cfg.head_dim, model.dtype, resolve_kv_cache_dtype(config, model))
