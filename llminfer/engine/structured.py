"""Structured outputs: a request's tokens constrained to a JSON schema, a regular expression, a choice among
strings, or a grammar (Lark or GBNF).

llguidance (the grammar engine llama.cpp and vLLM use) compiles the constraint against the tokenizer's
vocabulary and keeps one matcher per request, which knows every token that can continue what was generated
so far. Each step the runner asks for the batch's masks before it runs the model; they are computed on a
worker thread (llguidance releases the GIL) while the model runs, and the sampler sets every other token to
-inf. The matcher consumes each drawn token; a preempted request keeps its output tokens, so its matcher
stays in step with it.

Fail closed: a schema keyword, format or grammar feature llguidance cannot enforce is refused when the
request is submitted (InvalidSamplingParamsError naming it), never ignored.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from llminfer.errors import InvalidSamplingParamsError

if TYPE_CHECKING:
    import torch

# torch is imported where masks are made, not here: SamplingParams (and so the torch-free lite runtime) imports
# StructuredOutput from this module.

logger = logging.getLogger(__name__)

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# JSON is generated compactly (one space after ',' and ':', no free whitespace): a small model given free
# whitespace can fill max_tokens with newlines, and the output parses to the same value either way.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match: exactly one of the fields.

    json: a JSON schema (dict or its JSON text); json_object: any JSON object; regex: a regular expression
    the whole output matches; choice: one of these strings; grammar: a Lark grammar (llguidance's dialect)
    or a GBNF grammar (llama.cpp's), told apart by their syntax.
    """

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [kind for kind in KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise InvalidSamplingParamsError(
                f"invalid structured output: expected exactly one of {', '.join(KINDS)}, got "
                f"{', '.join(given) or 'none'}", field="structured")
        kind = given[0]
        value = getattr(self, kind)
        if kind == "json":
            if isinstance(value, str):
                try:
                    parsed = json.loads(value)
                except ValueError as exc:
                    raise InvalidSamplingParamsError(f"invalid structured output json: the schema is not valid "
                                                     f"JSON ({exc})", field="structured.json") from None
            else:
                parsed = value
            if not isinstance(parsed, (dict, bool)):
                raise InvalidSamplingParamsError(f"invalid structured output json: expected a JSON schema object, "
                                                 f"got {type(parsed).__name__}", field="structured.json")
        elif kind == "json_object":
            if value is not True:
                raise InvalidSamplingParamsError("invalid structured output json_object: expected true",
                                                 field="structured.json_object")
        elif kind == "choice":
            if not value or not all(isinstance(c, str) and c for c in value):
                raise InvalidSamplingParamsError("invalid structured output choice: expected a non-empty list of "
                                                 "non-empty strings", field="structured.choice")
        elif not isinstance(value, str) or not value.strip():
            raise InvalidSamplingParamsError(f"invalid structured output {kind}: expected a non-empty string",
                                             field=f"structured.{kind}")

    @property
    def kind(self) -> str:
        return next(kind for kind in KINDS if getattr(self, kind) not in (None, False))

    def key(self) -> str:
        """A stable text of the constraint (compiled grammars are cached under it)."""
        value = getattr(self, self.kind)
        return f"{self.kind}:{value if isinstance(value, str) else json.dumps(value, sort_keys=True)}"


def _llguidance():
    import llguidance  # noqa: PLC0415 (loaded on the first constrained request: its tokenizer takes 0.4 s)

    return llguidance


class GrammarCompiler:
    """Compiles constraints for one tokenizer and hands out matchers. The llguidance view of the vocabulary
    is built on first use; compiled grammars are cached by their text."""

    CACHE_SIZE = 256

    def __init__(self, backend_json: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._backend_json, self.vocab_size = backend_json, vocab_size
        self._eos = sorted(eos_token_ids)
        self._tokenizer = None
        self._compiled: dict[str, str] = {}
        self._lock = threading.Lock()  # the server checks requests on its thread while the engine runs on another

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> "GrammarCompiler":
        return cls(tokenizer.backend.to_str(), vocab_size, eos_token_ids)

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                started = time.perf_counter()
                self._tokenizer = _llguidance().LLTokenizer(self._backend_json, n_vocab=self.vocab_size,
                                                            eos_token=self._eos or None)
                logger.info("structured outputs: vocabulary of %d tokens indexed in %.2f s", self.vocab_size,
                            time.perf_counter() - started)
            return self._tokenizer

    def compile(self, spec: StructuredOutput) -> str:
        """The llguidance grammar of a constraint, checked: anything it cannot enforce raises, naming it."""
        key = spec.key()
        with self._lock:
            if key in self._compiled:
                return self._compiled[key]
        grammar = self._grammar_text(spec)
        tokenizer = self.tokenizer
        is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise InvalidSamplingParamsError(f"invalid structured output {spec.kind}: {_one_line(messages[0])}",
                                             field=f"structured.{spec.kind}")
        with self._lock:
            if len(self._compiled) >= self.CACHE_SIZE:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[key] = grammar
        return grammar

    @staticmethod
    def _grammar_text(spec: StructuredOutput) -> str:
        llguidance = _llguidance()
        matcher = llguidance.LLMatcher
        kind = spec.kind
        try:
            if kind == "json":
                return matcher.grammar_from_json_schema(spec.json, overrides=JSON_OPTIONS)
            if kind == "json_object":
                return matcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
            if kind == "regex":
                return matcher.grammar_from_regex(spec.regex)
            if kind == "choice":
                return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
            return llguidance.grammar_from("grammar", spec.grammar)
        except ValueError as exc:
            raise InvalidSamplingParamsError(f"invalid structured output {kind}: {_one_line(str(exc))}",
                                             field=f"structured.{kind}") from None

    def matcher(self, spec: StructuredOutput) -> "GrammarMatcher":
        return GrammarMatcher(_llguidance().LLMatcher(self.tokenizer, self.compile(spec), log_level=0))


def _one_line(message: str) -> str:
    return " ".join(message.split())[:300]


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher) -> None:
        self.matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance past a drawn token; False if the grammar does not allow it (then the request fails)."""
        return self.matcher.consume_token(token_id)

    @property
    def is_finished(self) -> bool:
        """Nothing can follow any more (the output is complete)."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class MaskWorker:
    """Computes a batch's token masks on a thread while the model runs. Counts the time spent, so
    benchmarks can report the mask time per token and how much of it the step waited for."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llminfer-masks")
        self._executor = None
        self.mask_seconds = 0.0  # computing masks (on the worker)
        self.wait_seconds = 0.0  # the step waiting for them after its forward pass
        self.masks = 0

    def start(self, matchers: list[GrammarMatcher | None]) -> Future | None:
        """Begin the masks of the constrained rows; None when no row is constrained."""
        rows = [(i, m) for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        return self._pool.submit(self._compute, rows)

    def _compute(self, rows: list[tuple[int, GrammarMatcher]]) -> tuple[list[int], "torch.Tensor"]:
        import torch

        started = time.perf_counter()
        llguidance = _llguidance()
        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=1)
        bitmask = torch.zeros(len(rows), self.words, dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr([(m.matcher, j) for j, (_, m) in enumerate(rows)],
                                               bitmask.data_ptr(), self.words * 4, len(rows))
        allowed = unpack_bitmask(bitmask, self.vocab_size)
        self.mask_seconds += time.perf_counter() - started
        self.masks += len(rows)
        return [i for i, _ in rows], allowed

    def finish(self, pending: Future | None) -> tuple[list[int], "torch.Tensor"] | None:
        """Wait for the masks begun by start(): (the rows, their [R, V] allowed-token table)."""
        if pending is None:
            return None
        started = time.perf_counter()
        result = pending.result()
        self.wait_seconds += time.perf_counter() - started
        return result


def unpack_bitmask(bitmask: "torch.Tensor", vocab_size: int) -> "torch.Tensor":
    """[R, ceil(V/32)] int32 words (bit b of word w is token 32w + b) -> [R, V] bool."""
    import torch

    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, :vocab_size]
