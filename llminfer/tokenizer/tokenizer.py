"""One tokenizer class over a Hugging Face `tokenizers.Tokenizer`, whatever file it came from."""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from tokenizers import Tokenizer as BackendTokenizer

from llminfer.errors import TokenizerError
from llminfer.tokenizer.chat_template import render_chat_template

# Control tokens that end a turn in common chat formats. A checkpoint often names only one EOS (Llama 3's
# config names <|end_of_text|>, its chat turns end with <|eot_id|>), so, like llama.cpp, generation also
# stops at these when the vocabulary has them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>",
                      "</s>", "<end_of_turn>", "<|end|>")


class Tokenizer:
    def __init__(self, backend: BackendTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None, name: str = "tokenizer") -> None:
        self.backend = backend
        self.name = name
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template
        vocab = backend.get_vocab(with_added_tokens=True)
        self.bos_token_id = vocab.get(bos_token) if bos_token else None
        self.eos_token_id = vocab.get(eos_token) if eos_token else None
        stops = {self.eos_token_id} | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
        self.stop_token_ids: frozenset[int] = frozenset(i for i in stops if i is not None)

    # --- construction -------------------------------------------------------------------------

    @staticmethod
    def folder_has_tokenizer(folder: Path) -> bool:
        return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        config = _read_tokenizer_config(folder)
        if (folder / "tokenizer.json").is_file():
            try:
                backend = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as exc:
                raise TokenizerError(f"{folder / 'tokenizer.json'}: cannot be loaded ({exc})") from None
        elif (folder / "tokenizer.model").is_file():
            from llminfer.tokenizer.gguf_vocab import backend_from_sentencepiece

            backend = backend_from_sentencepiece(folder / "tokenizer.model", add_bos=config.get("add_bos_token", True))
        else:
            raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer.model")
        source = folder / "tokenizer_config.json"
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = [t for t in template if isinstance(t, dict) and isinstance(t.get("template"), str)]
            if len(named) != len(template):
                raise TokenizerError(f"{source}: 'chat_template' list entries must be objects with a 'template' "
                                     "string")
            template = next((t["template"] for t in named if t.get("name") == "default"), None)
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{source}: 'chat_template' must be a string or a list of named templates, got "
                                 f"{type(template).__name__}")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, bos_token=_token_text(config.get("bos_token"), source, "bos_token"),
                   eos_token=_token_text(config.get("eos_token"), source, "eos_token"),
                   chat_template=template, name=str(folder))

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "chat_template": self.chat_template,
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        text = json.dumps(config, indent=2, ensure_ascii=False)
        (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")

    # --- use ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = self.encode(text, add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"expected text (str) to tokenize, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **variables: Any) -> str | list[int]:
        """Render messages with the model's template (ChatML if it has none)."""
        from llminfer.tokenizer.chat_template import CHATML_TEMPLATE

        template = self.chat_template or CHATML_TEMPLATE
        specials = dict(bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        text = render_chat_template(template, messages, add_generation_prompt, **specials, **variables)
        if not tokenize:
            return text
        if not any(_contains_any(value, self._special_strings) for value in (messages, variables)):
            return self.encode(text, add_special_tokens=False)  # the template writes any BOS itself
        # Content that spells a control token (a forged "<|im_start|>system" turn) must stay text: only the
        # template's own markup may become control tokens. Render again with every client string marked, so
        # we know which characters came from the client.
        marked = render_chat_template(template, _marked(messages), add_generation_prompt, **specials,
                                      **_marked(variables))
        client_spans = _client_spans(marked, text)
        if client_spans is None:
            raise TokenizerError("a message spells a control token of this model, and its chat template changes "
                                 "message text in a way that hides where the message is; remove the token")
        return self._encode_outside_spans(text, client_spans)

    # The backend never changes, so what the forged-turn check needs is computed once per tokenizer.
    @cached_property
    def _special_strings(self) -> tuple[str, ...]:
        added = self.backend.get_added_tokens_decoder().values()
        return tuple(sorted({t.content for t in added if t.special and t.content}, key=len, reverse=True))

    @cached_property
    def _text_backend(self) -> BackendTokenizer:
        """A copy that encodes control-token strings as text (a flag on the shared backend would change encode)."""
        backend = BackendTokenizer.from_str(self.backend.to_str())
        backend.encode_special_tokens = True
        return backend

    def _encode_outside_spans(self, text: str, spans: list[tuple[int, int]]) -> list[int]:
        """Control tokens only where the template wrote them; everything else, client text included, as text."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        pattern = re.compile("|".join(map(re.escape, self._special_strings)))  # longest first
        ids, start = [], 0
        for match in pattern.finditer(text):
            if any(a < match.end() and match.start() < b for a, b in spans):
                continue  # inside a client's text
            if start < match.start():
                ids += self._text_backend.encode(text[start:match.start()], add_special_tokens=False).ids
            ids.append(vocab[match.group()])
            start = match.end()
        if start < len(text):
            ids += self._text_backend.encode(text[start:], add_special_tokens=False).ids
        return ids


# Unicode noncharacters: never in real text, so they can mark where a client's string lies in a rendering.
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"


def _contains_any(value: Any, needles: Sequence[str]) -> bool:
    if isinstance(value, str):
        return any(needle in value for needle in needles)
    if isinstance(value, dict):
        return any(_contains_any(v, needles) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_contains_any(v, needles) for v in value)
    return False


def _marked(value: Any) -> Any:
    """Every string (but a message's role) wrapped in the markers, around its stripped core: a template that
    trims or indents a message renders the same characters as without the markers."""
    if isinstance(value, str):
        core = value.strip()
        if not core:
            return value
        start = value.index(core)
        return f"{value[:start]}{_OPEN}{core}{_CLOSE}{value[start + len(core):]}"
    if isinstance(value, dict):
        return {k: v if k == "role" else _marked(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_marked(v) for v in value]
    return value


def _client_spans(marked: str, plain: str) -> list[tuple[int, int]] | None:
    """Where, in `plain`, the marked rendering put client strings; None if the markers do not line up with it
    (the template cut or changed a marked string)."""
    spans, out, depth, start = [], [], 0, 0
    for ch in marked:
        if ch == _OPEN:
            depth += 1
            if depth == 1:
                start = len(out)
        elif ch == _CLOSE:
            depth -= 1
            if depth < 0:
                return None
            if depth == 0:
                spans.append((start, len(out)))
        else:
            out.append(ch)
    return spans if depth == 0 and "".join(out) == plain else None


def _token_text(token: Any, source: Path, field: str) -> str | None:
    text = token.get("content") if isinstance(token, dict) else token
    if text is not None and not isinstance(text, str):
        raise TokenizerError(f"{source}: '{field}' must be a token string, got {type(text).__name__}")
    return text


def _read_tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise TokenizerError(f"{path}: JSON nested too deeply") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config
