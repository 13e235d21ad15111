"""GGUF files (llama.cpp): metadata -> ModelConfig, tensors dequantized into HF names and layout."""

from __future__ import annotations

import logging
import re
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from tqdm.auto import tqdm

from llminfer.architectures import ARCHITECTURES, Architecture
from llminfer.config import ModelConfig
from llminfer.errors import ConfigError, ModelFormatError, UnsupportedModelError
from llminfer.layers.rotary import rope_inverse_frequencies
from llminfer.loading.checkpoint import Checkpoint
from llminfer.loading.gguf_header import check_gguf_header

if TYPE_CHECKING:
    from llminfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Q = GGMLQuantizationType
SUPPORTED_TENSOR_TYPES = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str, architecture: Architecture) -> str | None:
    """HF parameter name of a GGUF tensor, or None for tensors the network does not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    block_names = architecture.gguf_block_names
    if match and match.group(2) in block_names:
        return f"model.layers.{match.group(1)}.{block_names[match.group(2)]}.{match.group(3)}"
    return None


def gguf_architectures() -> dict[str, Architecture]:
    return {a.gguf_architecture: a for a in ARCHITECTURES.values() if a.gguf_architecture}


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> HF's rotate-half halves)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# Llama 3.x releases: factor 8 (3.1), 32 (3.2), 16; the other parameters are shared.
_LLAMA3_ROPE_CANDIDATES = [{"rope_type": "llama3", "factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192} for f in (8.0, 32.0, 16.0)]


def llama3_scaling_matching(factors: list[float], head_dim: int, theta: float) -> dict[str, Any] | None:
    """The HF llama3 rope_scaling whose per-frequency divisors equal GGUF's rope_freqs, if one does."""
    base = rope_inverse_frequencies(head_dim, theta, None)
    for candidate in _LLAMA3_ROPE_CANDIDATES:
        divisors = base / rope_inverse_frequencies(head_dim, theta, candidate)
        if len(factors) == len(divisors) and torch.allclose(divisors, torch.tensor(factors), rtol=1e-4):
            return dict(candidate)
    return None


class GGUFCheckpoint(Checkpoint):
    format = "gguf"

    def __init__(self, path: Path, name: str | None = None) -> None:
        super().__init__(name or str(path))
        self.path = path
        check_gguf_header(path)  # the reader trusts the counts it reads
        try:
            self.reader = GGUFReader(str(path))
        except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on bad bytes
            message = f"{path}: not a valid GGUF file ({type(exc).__name__}: {exc})".splitlines()[0]
            raise ModelFormatError(message) from None
        self.architecture = self.metadata.get("general.architecture")
        known = gguf_architectures()
        if self.architecture not in known:
            raise UnsupportedModelError(f"{path}: GGUF architecture '{self.architecture}' is not supported "
                                        f"(supported: {', '.join(sorted(known))})")
        self.entry = known[self.architecture]

    @cached_property
    def metadata(self) -> dict[str, Any]:
        values = {}
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                values[key] = field.contents()
            except Exception as exc:
                raise ModelFormatError(f"{self.path}: metadata '{key}' cannot be read ({exc})") from None
        return values

    def _meta(self, key: str, default: Any = ...) -> Any:
        full = f"{self.architecture}.{key}"
        if full in self.metadata:
            return self.metadata[full]
        if default is ...:
            raise ModelFormatError(f"{self.path}: missing required GGUF metadata '{full}'")
        return default

    def model_config(self) -> ModelConfig:
        heads = self._meta("attention.head_count")
        hidden = self._meta("embedding_length")
        for key, value in (("attention.head_count", heads), ("embedding_length", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{self.path}: GGUF metadata '{self.architecture}.{key}' must be a positive "
                                  f"integer, got {value!r}")
        head_dim = self._meta("attention.key_length", hidden // heads)
        vocab = self._meta("vocab_size", None) or len(self.metadata.get("tokenizer.ggml.tokens") or [])
        eos = self.metadata.get("tokenizer.ggml.eos_token_id")
        scaling = None
        if self._meta("rope.scaling.type", "none") == "linear":
            scaling = {"rope_type": "linear", "factor": self._meta("rope.scaling.factor")}
        if "rope_freqs.weight" in self._tensors_by_name:  # Llama 3.1+ long-context frequency factors
            factors = self._dequantized(self._tensors_by_name["rope_freqs.weight"]).reshape(-1).tolist()
            scaling = llama3_scaling_matching(factors, head_dim, float(self._meta("rope.freq_base", 10000.0))) \
                or {"rope_type": "freq_factors", "freq_factors": factors}
        return ModelConfig(
            model_type=self.entry.model_type,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=self._meta("feed_forward_length"),
            num_hidden_layers=self._meta("block_count"),
            num_attention_heads=heads,
            num_key_value_heads=self._meta("attention.head_count_kv", heads),
            head_dim=head_dim,
            max_position_embeddings=self._meta("context_length", 2048),
            rms_norm_eps=float(self._meta("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self._meta("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            tie_word_embeddings="output.weight" not in self._tensors_by_name,
            qk_norm="blk.0.attn_q_norm.weight" in self._tensors_by_name,
            attention_bias="blk.0.attn_q.bias" in self._tensors_by_name,
            sliding_window=self._meta("attention.sliding_window", None),
            bos_token_id=self.metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=(eos,) if eos is not None else (),
            torch_dtype="float32",
            **self.entry.gguf_config(self._meta),
        )

    @cached_property
    def _tensors_by_name(self) -> dict[str, Any]:
        return {t.name: t for t in self.reader.tensors}

    def tensor_names(self) -> list[str]:
        return [n for n in (hf_name(t.name, self.entry) for t in self.reader.tensors) if n is not None]

    def tensor_shapes(self) -> dict[str, tuple[str, list[int]]]:
        shapes = {}
        for tensor in self.reader.tensors:
            name = hf_name(tensor.name, self.entry)
            if name is not None:  # GGUF lists dims innermost-first
                shapes[name] = (tensor.tensor_type.name, [int(d) for d in reversed(tensor.shape)])
        return shapes

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        config = self.config
        for tensor in tqdm(self.reader.tensors, desc=f"Dequantizing {self.path.name}", unit="tensor",
                           leave=False, disable=None):
            name = hf_name(tensor.name, self.entry)
            if name is None:
                logger.debug("%s: skipping GGUF tensor %s", self.path, tensor.name)
                continue
            array = self._dequantized(tensor)
            # llama.cpp's converter permutes Q/K rows of some architectures for its rotary kernel.
            permuted = self.entry.gguf_permutes_qk
            if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
                array = unpermute_rope_rows(array, config.num_attention_heads)
            elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
                array = unpermute_rope_rows(array, config.num_key_value_heads)
            if self.entry.gguf_norm_offset and name.endswith("norm.weight"):
                array = array - self.entry.gguf_norm_offset
            yield name, torch.from_numpy(np.require(array, requirements=["C", "W"]))

    def _dequantized(self, tensor: Any) -> np.ndarray:
        qtype = tensor.tensor_type
        if qtype not in SUPPORTED_TENSOR_TYPES:
            raise UnsupportedModelError(f"{self.path}: tensor '{tensor.name}' has type {qtype.name}, not supported "
                                        f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))})")
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost-first
        try:
            data = np.asarray(tensor.data) if qtype in (Q.F32, Q.F16) else dequantize(tensor.data, qtype)
            return data.astype(np.float32, copy=False).reshape(shape)
        except (ValueError, IndexError) as exc:
            raise ModelFormatError(f"{self.path}: tensor '{tensor.name}' is truncated or corrupt ({exc})") from None

    def sampling_defaults(self) -> dict[str, float | int]:
        from llminfer.loading.sampling_defaults import from_gguf_metadata

        return from_gguf_metadata(self.metadata, self.name)

    def tokenizer(self) -> "Tokenizer":
        from llminfer.tokenizer.gguf_vocab import tokenizer_from_gguf_metadata

        return tokenizer_from_gguf_metadata(self.metadata, str(self.path))
