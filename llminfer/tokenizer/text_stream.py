"""Generated text as it streams: detokenized a token at a time, cut at the first stop string, handed out with
a held-back tail that could still become one. Shared by the engine's requests and the lite runtime."""

from __future__ import annotations

from llminfer.tokenizer.detokenizer import IncrementalDetokenizer


class TextStream:
    def __init__(self, detokenizer: IncrementalDetokenizer, stop: list[str]) -> None:
        self.detokenizer = detokenizer
        self.stop = stop
        self.text = ""  # generated text so far, stop string cut off
        self._emitted = 0  # how much of `text` has been handed out

    def add(self, token_id: int) -> bool:
        """Append one token's text; True when a stop string appeared (the text is cut before it)."""
        self.text += self.detokenizer.add(token_id)
        return self._cut_at_stop_string()

    def flush(self) -> None:
        """Generation ended for another reason (length): whatever the detokenizer held back is final text."""
        self.text += self.detokenizer.flush()
        self._cut_at_stop_string()

    def _cut_at_stop_string(self) -> bool:
        if not self.stop:
            return False
        longest = max(len(s) for s in self.stop)
        search_from = max(0, self._emitted - longest)  # a stop string may straddle old and new text
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out, holding back (until finished) a tail that could still become a stop string."""
        hold = 0 if finished else max((len(s) - 1 for s in self.stop), default=0)
        end = max(self._emitted, len(self.text) - hold)
        delta, self._emitted = self.text[self._emitted:end], end
        return delta
