"""Token ids -> text, a piece at a time, never emitting half of a multi-byte character."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llminfer.tokenizer.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Decodes a growing id list, emitting only text that later tokens cannot change.

    Decoding a window that starts a few tokens back (prefix_offset) keeps leading-space and
    byte-fallback rules right; text ending in U+FFFD is an incomplete UTF-8 sequence and is held
    back until the next token completes it.
    """

    def __init__(self, tokenizer: "Tokenizer", prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-6:])  # a little prompt context for the first tokens' spacing
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the newly finished text (possibly empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full_text = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        new_text = full_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += new_text
        return new_text

    def flush(self) -> str:
        """At the end of generation: whatever was held back, even if it is not valid UTF-8."""
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full_text = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        rest = full_text[len(prefix_text):] if len(full_text) > len(prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += rest
        return rest
