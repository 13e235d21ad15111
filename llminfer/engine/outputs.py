from __future__ import annotations

from dataclasses import dataclass

from llminfer.engine.sampler import TokenLogprob


@dataclass
class CompletionOutput:
    """One sample of a request."""

    index: int
    text: str  # generated text, stop string excluded
    token_ids: list[int]  # generated ids
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    delta: str = ""  # text new since the previous step (streaming)
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when SamplingParams.logprobs is set
    error: str | None = None  # with finish_reason "error": what went wrong (the other requests went on)


@dataclass
class RequestOutput:
    """What a request returns: its prompt and its n samples (one unless SamplingParams.n > 1)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # With SamplingParams.prompt_logprobs: one per prompt token, None for the first (nothing predicts it)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    # The first sample's fields, for the common n == 1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def delta(self) -> str:
        return self.outputs[0].delta

    @property
    def error(self) -> str | None:
        """The first failed sample's error (finish_reason "error"), or None."""
        return next((c.error for c in self.outputs if c.error is not None), None)
