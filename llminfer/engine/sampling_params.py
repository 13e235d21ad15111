"""How one request wants its tokens chosen and when to stop. Validated on construction.

Validation admits only values the sampler can use without overflowing: every number finite, integers that
fit the tensors and generators they end up in, penalties bounded so that penalised logits stay finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llminfer.engine.structured import StructuredOutput
from llminfer.errors import InvalidSamplingParamsError

# Below this temperature, logits / temperature overflows float32 long before it changes the choice: greedy
# (vLLM uses the same floor).
GREEDY_TEMPERATURE = 1e-5
# The repetition penalty multiplies or divides logits: beyond this range it only manufactures overflow.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds
MAX_TOP_K = 2**31 - 1  # the engine also refuses a top_k larger than the model's vocabulary


@dataclass
class SamplingParams:
    max_tokens: int = 16  # 0: score the prompt only (with prompt_logprobs), generate nothing
    n: int = 1  # samples per prompt; they share the prompt's KV blocks
    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE) means greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output (CTRL-style)
    presence_penalty: float = 0.0  # OpenAI-style, over generated tokens
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)  # strings that end generation; not included in the text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None  # per-request seed: same seed, same output; sample i of n draws from seed + i
    skip_special_tokens: bool = True
    logprobs: int | None = None  # report each sampled token's log-probability and this many top alternatives
    structured: StructuredOutput | None = None  # the output must match this JSON schema, regex, choice or grammar
    prompt_logprobs: int | None = None  # each prompt token's log-probability (the first has none) and top ones

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(_integer(self.max_tokens) and self.max_tokens >= 0, "max_tokens", self.max_tokens, "an integer >= 1")
        _check(self.max_tokens != 0 or self.n == 1, "n", self.n, "1 when max_tokens is 0 (nothing is sampled)")
        _check(self.max_tokens != 0 or self.prompt_logprobs is not None, "max_tokens", self.max_tokens,
               "an integer >= 1 (0 only to score the prompt, with prompt_logprobs)")
        _check(_integer(self.n) and self.n >= 1, "n", self.n, "an integer >= 1")
        _check(_number(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
               "a finite number >= 0 (0 means greedy)")
        _check(_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(_integer(self.top_k) and -1 <= self.top_k <= MAX_TOP_K, "top_k", self.top_k,
               "an integer >= 1, or 0 / -1 for off")
        _check(_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        low, high = REPETITION_PENALTY_RANGE
        _check(_number(self.repetition_penalty) and low <= self.repetition_penalty <= high, "repetition_penalty",
               self.repetition_penalty, f"in [{low:g}, {high:g}] (1 = off)")
        _check(_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
               self.presence_penalty, "in [-2, 2]")
        _check(_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
               self.frequency_penalty, "in [-2, 2]")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "a list of non-empty strings")
        _check(all(_integer(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", self.stop_token_ids,
               "a list of token ids >= 0")
        if _integer(self.n):  # sample i seeds its generator with seed + i: all n of them must fit 64 bits
            _check(self.seed is None or (_integer(self.seed) and 0 <= self.seed <= MAX_SEED - (self.n - 1)), "seed",
                   self.seed, f"an integer in [0, 2**64 - n] (here [0, {MAX_SEED - (self.n - 1)}])")
        _check(self.logprobs is None or (_integer(self.logprobs) and 0 <= self.logprobs <= self.MAX_LOGPROBS),
               "logprobs", self.logprobs, f"an integer in [0, {self.MAX_LOGPROBS}] or None")
        _check(self.prompt_logprobs is None or (_integer(self.prompt_logprobs)
                                                and 0 <= self.prompt_logprobs <= self.MAX_LOGPROBS),
               "prompt_logprobs", self.prompt_logprobs, f"an integer in [0, {self.MAX_LOGPROBS}] or None")
        _check(self.structured is None or isinstance(self.structured, StructuredOutput), "structured",
               self.structured, "a StructuredOutput or None")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise InvalidSamplingParamsError(f"invalid sampling parameter {name}={value!r}: expected {expected}",
                                         field=name)
