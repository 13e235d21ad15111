"""Which share of the model each tensor-parallel rank holds (Megatron-style).

The plan divides dimensions: attention heads, KV heads (with fewer KV heads than ranks, each is replicated on
the ranks whose query heads use it), the MLP width and the vocabulary. Which dimension a layer splits, and
along which axis, is the layer's own knowledge: the LayerFactory gives each projection its role (column, row,
vocabulary) and its share from this plan, and the layer answers `tensor_split(suffix, shard)` for each of its
checkpoint tensors (quantized layers by their scheme's rules). The same answers serve on-the-fly splitting at
load and the offline `llminfer shard`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llminfer.config import ModelConfig, QuantizationConfig
from llminfer.errors import ConfigError


def valid_tp_sizes(config: ModelConfig, limit: int = 64, quantization: QuantizationConfig | None = None) -> list[int]:
    return [n for n in range(1, limit + 1) if _problem(config, n, quantization) is None]


def _problem(config: ModelConfig, n: int, quantization: QuantizationConfig | None = None) -> str | None:
    if config.num_attention_heads % n:
        return f"{config.num_attention_heads} attention heads"
    kv = config.num_key_value_heads
    if kv % n and n % kv:
        return f"{kv} key/value heads"
    if config.intermediate_size % n:
        return f"intermediate size {config.intermediate_size}"
    if config.vocab_size % n:
        return f"vocabulary of {config.vocab_size}"
    if quantization is not None and quantization.group_size:  # int4 groups must not straddle two ranks
        group = quantization.group_size
        if (config.num_attention_heads // n * config.head_dim) % group or (config.intermediate_size // n) % group:
            return f"row-parallel projections into whole int4 groups of {group}"
    return None


def check_tp_size(config: ModelConfig, n: int, source: str = "model",
                  quantization: QuantizationConfig | None = None) -> None:
    if n < 1:
        raise ConfigError(f"tensor parallel size must be >= 1, got {n}")
    problem = _problem(config, n, quantization)
    if problem is not None:
        valid = ", ".join(map(str, valid_tp_sizes(config, max(n, 16), quantization)))
        raise ConfigError(f"{source}: tensor parallel size {n} does not divide its {problem} "
                          f"(valid sizes: {valid})")


@dataclass(frozen=True)
class ShardPlan:
    config: ModelConfig  # the full model
    rank: int
    world_size: int
    quantization: QuantizationConfig | None = None  # a quantized checkpoint: its packed tensors split too

    def __post_init__(self) -> None:
        check_tp_size(self.config, self.world_size, quantization=self.quantization)

    @property
    def heads(self) -> int:
        return self.config.num_attention_heads // self.world_size

    @property
    def kv_heads(self) -> int:
        return max(1, self.config.num_key_value_heads // self.world_size)

    @property
    def rank_config(self) -> ModelConfig:
        """The network one rank builds: its share of heads and of the MLP width (vocabulary kept whole here;
        the embedding and LM head are sliced by the parallel layers)."""
        return replace(self.config, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                       intermediate_size=self.config.intermediate_size // self.world_size)

    def full_width(self, split_by: str) -> int:
        cfg = self.config
        return {"heads": cfg.num_attention_heads * cfg.head_dim, "kv_heads": cfg.num_key_value_heads * cfg.head_dim,
                "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size}[split_by]

    def share(self, split_by: str) -> tuple[int, int]:
        """(start, length) of this rank's part of a dimension."""
        cfg, r, n, d = self.config, self.rank, self.world_size, self.config.head_dim
        if split_by == "heads":
            return r * self.heads * d, self.heads * d
        if split_by == "kv_heads":
            if cfg.num_key_value_heads >= n:
                return r * self.kv_heads * d, self.kv_heads * d
            return r * cfg.num_key_value_heads // n * d, d  # replicated: the KV head this rank's query heads read
        width = self.full_width(split_by) // n
        return r * width, width
