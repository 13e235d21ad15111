"""Chat templates (Jinja2, as in tokenizer_config.json or GGUF metadata), rendered in a sandbox.

Templates come from model files, so they are untrusted code: the immutable sandbox stops them
from reaching Python internals or mutating what we pass in.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llminfer.errors import TokenizerError


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str):
    # Same whitespace rules as Hugging Face, so templates render byte-for-byte as they do there.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise TokenizerError(f"chat template does not compile: {exc}") from None


def render_chat_template(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise TokenizerError(f"chat message {i}: expected a dict with 'role' and 'content', got {message!r}"[:200])
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except TokenizerError:
        raise
    except Exception as exc:  # TemplateError, or a TypeError inside the template's own logic
        raise TokenizerError(f"chat template failed to render: {type(exc).__name__}: {exc}") from None


# Used when a model ships no template: the ChatML layout most small chat models were tuned on.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
