from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestOutput:
    """What a finished (or streaming) request returns."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str  # generated text, stop string excluded
    token_ids: list[int]  # generated ids
    finish_reason: str | None  # "stop" | "length" | None while running
    delta: str = ""  # text new since the previous step (streaming)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
