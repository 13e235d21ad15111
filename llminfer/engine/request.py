"""A request's state as it moves from waiting to running to finished."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from llminfer.engine.outputs import CompletionOutput
from llminfer.engine.sampler import TokenLogprob
from llminfer.engine.sampling_params import SamplingParams
from llminfer.engine.structured import GrammarMatcher
from llminfer.tokenizer.text_stream import TextStream


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One sample being generated. A prompt asked for with n > 1 becomes n of these (a group), forked
    after the prompt is computed so they share its KV blocks."""

    request_id: str
    group_id: str  # the id the caller knows; samples of one prompt share it
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]  # EOS/end-of-turn ids plus the params' own
    generator: torch.Generator | None = None
    stream: TextStream | None = None  # the generated text (None: no tokenizer, ids only)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] | None = None  # one per output token when params.logprobs is set
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    error: str | None = None  # why it finished with finish_reason "error"
    sample_index: int = 0
    pending_forks: int = 0  # samples still to fork from this one once its first token is drawn
    num_computed_tokens: int = 0  # tokens whose keys/values are in the cache
    grammar: GrammarMatcher | None = None  # where a structured request is in its grammar
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # of prompt tokens 1.. (prompt_logprobs set)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the whole history on every decode step."""
        prompt_len = len(self.prompt_token_ids)
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len:end - prompt_len]
        return self.all_token_ids[start:end]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int, max_model_len: int, logprob: TokenLogprob | None = None) -> None:
        """Record a sampled token and decide whether the request is done."""
        if self.grammar is not None and not self.grammar.accept(token_id):  # the mask makes this a bug
            return self.fail(f"structured output: token {token_id} does not continue the grammar "
                             f"({self.grammar.error or 'rejected'})")
        self.output_token_ids.append(token_id)
        if logprob is not None:
            if self.output_logprobs is None:
                self.output_logprobs = []
            self.output_logprobs.append(logprob)
        if token_id in self.stop_token_ids:
            return self._finish("stop")
        if self.stream is not None and self.stream.add(token_id):
            return self._finish("stop")
        if self.grammar is not None and self.grammar.is_finished:  # the structure is complete
            return self._finish("stop", flush=True)
        if len(self.output_token_ids) >= self.params.max_tokens or self.num_tokens >= max_model_len:
            self._finish("length", flush=True)

    def finish_prompt_only(self) -> None:
        """max_tokens 0: the prompt is computed (and scored); nothing is generated."""
        self._finish("length")

    def abort(self) -> None:
        self.status, self.finish_reason = RequestStatus.FINISHED, "abort"

    def fail(self, error: str) -> None:
        """This request cannot go on (its logits were not finite): it finishes alone, the engine goes on."""
        self.status, self.finish_reason, self.error = RequestStatus.FINISHED, "error", error

    def _finish(self, reason: str, flush: bool = False) -> None:
        """flush: generation ended mid-text (not at a stop token or string), so held-back text is final."""
        if flush and self.stream is not None:
            self.stream.flush()
        self.status, self.finish_reason = RequestStatus.FINISHED, reason

    @property
    def text(self) -> str:
        return self.stream.text if self.stream is not None else ""

    def take_delta(self) -> str:
        """Text not yet streamed (a tail that could still become a stop string is held back)."""
        return self.stream.take_delta(self.is_finished) if self.stream is not None else ""

    def to_completion(self) -> CompletionOutput:
        return CompletionOutput(self.sample_index, self.text, list(self.output_token_ids), self.finish_reason,
                                self.take_delta(), None if self.output_logprobs is None else list(self.output_logprobs),
                                self.error)
