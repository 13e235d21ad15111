"""Text in and out: tokenizers from tokenizer.json, tokenizer.model or GGUF metadata; chat templates;
incremental detokenization for streaming."""

from llminfer.tokenizer.detokenizer import IncrementalDetokenizer
from llminfer.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer"]
