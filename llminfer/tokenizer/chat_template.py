"""Chat templates (Jinja2, as in tokenizer_config.json or GGUF metadata), rendered in a sandbox.

Templates come from model files, so they are untrusted code: the immutable sandbox stops them
from reaching Python internals or mutating what we pass in, and our subclass bounds what they can
allocate (`{{ 'a' * 10**9 }}`, doubling a string in a loop, a width of 10**9) and how much they write.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any, Callable

from jinja2 import TemplateError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from llminfer.errors import TokenizerError

# A rendered prompt this long is far beyond any context window; every value a template builds is held to it.
MAX_RENDERED_CHARS = 4 * 2**20
_HUGE_WIDTH = re.compile(r"\d{8,}")  # a printf / str.format width of 10**7 or more


def _too_big(what: str) -> TokenizerError:
    return TokenizerError(f"chat template: {what} is over the limit of {MAX_RENDERED_CHARS} characters")


def _sized(value: Any) -> Any:
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_RENDERED_CHARS:
        raise _too_big(f"a {type(value).__name__} of {len(value)} items")
    return value


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with the operators and calls that can allocate without limit checked before they run."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    if len(seq) * count > MAX_RENDERED_CHARS:
                        raise _too_big(f"repeating {len(seq)} items {count} times")
        if op == "**" and isinstance(right, (int, float)) and abs(right) > 64 and \
                isinstance(left, (int, float)) and abs(left) > 1:
            raise TokenizerError(f"chat template: {left!r} ** {right!r} is too large to compute")
        return _sized(super().call_binop(context, op, left, right))

    def call(self, context: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_RENDERED_CHARS:
                raise _too_big(f"an argument of {arg}")  # ljust(10**9), center(10**9), ...
        return _sized(super().call(context, obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Any:  # str.format / format_map, checked before formatting
        wrapped = super().wrap_str_format(value)
        if wrapped is not None and _HUGE_WIDTH.search(value.__self__):
            raise _too_big("a format width")
        return wrapped


class _BoundConcatenation(NodeTransformer):
    """`a ~ b` compiles to an inline join that no sandbox hook sees: route it through a checked function."""

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Call(nodes.Name("bounded_concat_", "load"), node.nodes, [], None, None, lineno=node.lineno)


def _bounded_concat(*parts: Any) -> str:
    return _sized("".join(map(str, parts)))


def _bounded_filter(name: str, jinja_filter: Callable[..., Any]) -> Callable[..., Any]:
    """The filter, with its width / length arguments (and for 'format' the format string) checked first."""
    value_at = 1 if hasattr(jinja_filter, "jinja_pass_arg") else 0  # after the environment Jinja passes some

    @functools.wraps(jinja_filter)  # keeps jinja_pass_arg: Jinja must still pass the environment
    def checked(*args: Any, **kwargs: Any) -> Any:
        value = args[value_at] if len(args) > value_at else None
        if name == "format" and isinstance(value, str) and _HUGE_WIDTH.search(value):
            raise _too_big("a format width")
        for arg in (*args[value_at + 1:], *kwargs.values()):
            if isinstance(arg, int) and abs(arg) > MAX_RENDERED_CHARS:
                raise _too_big(f"'{name}' with {arg}")
        return _sized(jinja_filter(*args, **kwargs))

    return checked


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str):
    # Same whitespace rules as Hugging Face, so templates render byte-for-byte as they do there.
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    for name in ("center", "indent", "format", "truncate", "wordwrap"):
        env.filters[name] = _bounded_filter(name, env.filters[name])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["bounded_concat_"] = _bounded_concat
    try:
        tree = _BoundConcatenation().visit(env.parse(template))
        return env.from_string(tree)
    except TemplateError as exc:
        raise TokenizerError(f"chat template does not compile: {exc}") from None


def render_chat_template(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise TokenizerError(f"chat message {i}: expected a dict with 'role' and 'content', got {message!r}"[:200])
    try:
        pieces, size = [], 0
        for piece in _compile(template).generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 **variables):
            size += len(piece)
            if size > MAX_RENDERED_CHARS:
                raise _too_big("the rendered prompt")
            pieces.append(piece)
        return "".join(pieces)
    except TokenizerError:
        raise
    except Exception as exc:  # TemplateError, or a TypeError inside the template's own logic
        raise TokenizerError(f"chat template failed to render: {type(exc).__name__}: {exc}") from None


# Used when a model ships no template: the ChatML layout most small chat models were tuned on.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
