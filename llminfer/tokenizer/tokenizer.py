"""One tokenizer class over a Hugging Face `tokenizers.Tokenizer`, whatever file it came from."""

from __future__ import annotations

import json
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
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, bos_token=_token_text(config.get("bos_token")),
                   eos_token=_token_text(config.get("eos_token")),
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

        text = render_chat_template(self.chat_template or CHATML_TEMPLATE, messages, add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "", **variables)
        # The template writes any BOS itself; encoding must not add a second one.
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _token_text(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _read_tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from None
