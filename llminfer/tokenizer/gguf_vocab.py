"""Build `tokenizers` tokenizers from a bare vocabulary: GGUF metadata or a sentencepiece model.

A GGUF carries no tokenizer.json, only tokens, scores or merges, token types and the name of
llama.cpp's pre-tokenizer. We rebuild the equivalent Hugging Face pipeline from those:
  - "gpt2" vocabularies are byte-level BPE with the merges given and a split regex picked by
    `tokenizer.ggml.pre`;
  - "llama" vocabularies are sentencepiece BPE: merges are recovered from the token scores,
    and unknown bytes fall back to <0xNN> tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from llminfer.errors import TokenizerError
from llminfer.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> the regex splits llama.cpp applies before BPE, in order.
PRE_TOKENIZER_SPLITS: dict[str, list[str]] = {
    "default": [_GPT2_SPLIT],
    "gpt2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],  # digits one at a time, as SmolLM's own tokenizer.json does
    "llama3": [_LLAMA3_SPLIT],
    "llama-v3": [_LLAMA3_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT],
    "smaug-bpe": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT],
    "deepseek-r1-qwen": [_QWEN2_SPLIT],
}


def tokenizer_from_gguf_metadata(metadata: dict[str, Any], name: str) -> Tokenizer:
    model = metadata.get("tokenizer.ggml.model")
    tokens: list[str] | None = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError(f"{name}: GGUF has no tokenizer.ggml.tokens vocabulary")
    types = list(metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    bos_id, eos_id = metadata.get("tokenizer.ggml.bos_token_id"), metadata.get("tokenizer.ggml.eos_token_id")
    # A file whose BOS is also its EOS (Qwen2's <|endoftext|>) uses it as a placeholder: the reference
    # tokenizers of such models add no BOS, whatever add_bos_token says.
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", model == "llama")) and bos_id != eos_id
    if model == "gpt2":
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZER_SPLITS:
            logger.warning("%s: unknown pre-tokenizer '%s'; using GPT-2's split rules", name, pre)
        merges = metadata.get("tokenizer.ggml.merges") or []
        backend = byte_level_bpe(tokens, merges, PRE_TOKENIZER_SPLITS.get(pre, [_GPT2_SPLIT]))
    elif model == "llama":
        scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        add_prefix_space = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        backend = sentencepiece_bpe(tokens, scores, types, add_prefix_space=add_prefix_space)
    else:
        raise TokenizerError(f"{name}: GGUF tokenizer model '{model}' is not supported (supported: gpt2, llama)")
    _add_special_tokens(backend, tokens, types)
    bos = tokens[bos_id] if bos_id is not None and bos_id < len(tokens) else None
    eos = tokens[eos_id] if eos_id is not None and eos_id < len(tokens) else None
    if add_bos and bos is not None:
        _prepend_bos(backend, bos, bos_id)
    return Tokenizer(backend, bos_token=bos, eos_token=eos, chat_template=metadata.get("tokenizer.chat_template"),
                     name=name)


def byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], splits: list[str]) -> BackendTokenizer:
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = BackendTokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def sentencepiece_bpe(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int],
                      add_prefix_space: bool = True) -> BackendTokenizer:
    """Sentencepiece BPE as `tokenizers` runs it: merges in score order, byte fallback, '▁' for spaces."""
    vocab = {token: i for i, token in enumerate(tokens)}
    unk = next((tokens[i] for i, t in enumerate(types) if t == UNKNOWN), None)
    mergeable = {tok: score for tok, score, typ in zip(tokens, scores, types) if typ in (NORMAL, USER_DEFINED)}
    backend = BackendTokenizer(BPE(vocab=vocab, merges=merges_from_scores(vocab, mergeable), unk_token=unk,
                                   fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁",
                                                     prepend_scheme="first" if add_prefix_space else "never",
                                                     split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a scored piece into two vocabulary pieces, best-scored pieces merged first."""
    ranked = []
    for piece, score in scores.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        ranked.extend((score, left, right) for left, right in splits)
    ranked.sort(key=lambda item: -item[0])  # stable: ties keep the vocabulary order above
    return [(left, right) for _, left, right in ranked]


def backend_from_sentencepiece(path: Path, add_bos: bool = True) -> BackendTokenizer:
    """A sentencepiece `tokenizer.model` (BPE type, as Llama 2 and Mistral ship) as a `tokenizers` backend."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise TokenizerError(f"{path}: reading tokenizer.model needs the 'sentencepiece' and 'protobuf' packages "
                             "(pip install 'llminfer[sentencepiece]')") from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:
        raise TokenizerError(f"{path}: not a sentencepiece model ({exc})") from None
    if proto.trainer_spec.model_type != 2:  # 2 = BPE
        raise TokenizerError(f"{path}: only sentencepiece BPE models are supported (this one is type "
                             f"{proto.trainer_spec.model_type}); convert it to tokenizer.json with transformers")
    tokens = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [p.type for p in proto.pieces]  # sentencepiece's enum matches llama.cpp's numbering
    backend = sentencepiece_bpe(tokens, scores, types, add_prefix_space=proto.normalizer_spec.add_dummy_prefix)
    _add_special_tokens(backend, tokens, types)
    bos_id = proto.trainer_spec.bos_id
    if add_bos and 0 <= bos_id < len(tokens):
        _prepend_bos(backend, tokens[bos_id], bos_id)
    return backend


def _add_special_tokens(backend: BackendTokenizer, tokens: Sequence[str], types: Sequence[int]) -> None:
    # Control tokens (<|im_end|>, <s>) are matched whole and skipped when decoding; user-defined
    # ones (<think>) are matched whole but kept in text.
    control = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == USER_DEFINED]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _prepend_bos(backend: BackendTokenizer, bos: str, bos_id: int) -> None:
    backend.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1",
                                                           special_tokens=[(bos, bos_id)])
