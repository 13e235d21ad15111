"""The engine loop: requests are added, each `step()` schedules, runs the model, samples, and reports."""

from __future__ import annotations

import itertools
import logging
from typing import Sequence

import torch

from llminfer.config import EngineConfig
from llminfer.engine.model_runner import ModelRunner
from llminfer.engine.outputs import RequestOutput
from llminfer.engine.request import Request
from llminfer.engine.sampling_params import SamplingParams
from llminfer.engine.scheduler import Scheduler
from llminfer.errors import InvalidPromptError, PromptTooLongError
from llminfer.kv_cache import ContiguousAttentionBackend, ContiguousKVCache
from llminfer.model.base import CausalLM
from llminfer.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

_CACHE_LEN_GRANULE = 256  # cache rows are sized in multiples of this, to avoid reallocating per request


class LLMEngine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None, config: EngineConfig,
                 extra_stop_token_ids: Sequence[int] = ()) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        model_len = model.config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or model_len, model_len)
        stop_ids = set(model.config.eos_token_id) | set(extra_stop_token_ids)
        if tokenizer is not None:
            stop_ids |= tokenizer.stop_token_ids
        self.eos_token_ids = frozenset(stop_ids)
        self.cache: ContiguousKVCache | None = None
        self.scheduler: Scheduler | None = None
        self.runner: ModelRunner | None = None
        self._ids = itertools.count()
        self._pending: list[Request] = []  # added, not yet handed to the scheduler

    # --- requests -----------------------------------------------------------------------------

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None) -> Request:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidPromptError("this model has no tokenizer: pass token ids, not text")
            prompt_text, prompt_ids = prompt, self.tokenizer.encode(prompt)
        else:
            prompt_text, prompt_ids = None, [int(t) for t in prompt]
        if not prompt_ids:
            raise InvalidPromptError("prompt is empty: expected at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLongError(f"prompt has {len(prompt_ids)} tokens; the context holds {self.max_model_len} "
                                     "(max_model_len), leaving no room to generate")
        bad = [t for t in prompt_ids if not 0 <= t < self.model.config.vocab_size]
        if bad:
            raise InvalidPromptError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.model.config.vocab_size})")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
        request = Request(request_id or str(next(self._ids)), prompt_text, prompt_ids, params, stop_ids,
                          generator, detokenizer)
        self._pending.append(request)
        return request

    def has_unfinished_requests(self) -> bool:
        return bool(self._pending) or (self.scheduler is not None and self.scheduler.has_work)

    # --- the loop -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One forward pass over the scheduled batch; outputs (with new text) for each request in it."""
        self._admit_pending()
        batch = self.scheduler.schedule()
        if not batch.requests:
            return []
        tokens = self.runner.step(batch)
        for request, token in zip(batch.requests, tokens):
            request.append_token(token, self.max_model_len)
        self.scheduler.release_finished()
        return [r.to_output() for r in batch.requests]

    def _admit_pending(self) -> None:
        """Hand pending requests to the scheduler, (re)sizing the cache first if it is idle and too small."""
        if not self._pending:
            return
        queued = self._pending + (list(self.scheduler.waiting) if self.scheduler else [])
        needed = max(self._cache_len_needed(r) for r in queued)
        idle = self.scheduler is None or not self.scheduler.running
        if idle and (self.cache is None or self.cache.max_len < needed
                     or self.cache.num_slots < min(len(queued), self.config.max_num_seqs)):
            self._allocate_cache(len(queued), needed)
        fitting = [r for r in self._pending if self._cache_len_needed(r) <= self.cache.max_len]
        for request in fitting:  # the rest wait until the running requests finish and the cache can grow
            self.scheduler.add(request)
            self._pending.remove(request)

    def _cache_len_needed(self, request: Request) -> int:
        return min(request.num_tokens + request.params.max_tokens, self.max_model_len)

    def _allocate_cache(self, num_requests: int, needed_len: int) -> None:
        cfg = self.model.config
        max_len = min(-(-needed_len // _CACHE_LEN_GRANULE) * _CACHE_LEN_GRANULE, self.max_model_len)
        slots = min(num_requests, self.config.max_num_seqs)
        logger.debug("allocating KV cache: %d slots x %d positions", slots, max_len)
        waiting = list(self.scheduler.waiting) if self.scheduler else []
        self.cache = None  # free the old cache before allocating the new one
        self.cache = ContiguousKVCache(cfg.num_hidden_layers, slots, max_len, cfg.num_key_value_heads, cfg.head_dim,
                                       self.model.dtype, self.model.device)
        self.scheduler = Scheduler(self.cache, self.config.max_num_seqs)
        for request in waiting:
            self.scheduler.add(request)
        self.runner = ModelRunner(self.model, ContiguousAttentionBackend(self.cache))

    def run_to_completion(self) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for output in self.step():
                if output.finished:
                    finished[output.request_id] = output
        return list(finished.values())
