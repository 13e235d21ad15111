"""How a checkpoint splits across tensor-parallel ranks (Megatron-style).

Column-parallel (output rows split): q/k/v, gate/up projections, the embedding and LM head (by vocabulary).
Row-parallel (input columns split, one all-reduce after): o_proj and down_proj. Attention heads follow their
projections; with fewer KV heads than ranks each KV head is replicated on the ranks whose query heads use it.
Norms are replicated. The same rules serve on-the-fly splitting at load and the offline `llminfer shard`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from llminfer.config import ModelConfig
from llminfer.errors import ConfigError


def valid_tp_sizes(config: ModelConfig, limit: int = 64) -> list[int]:
    return [n for n in range(1, limit + 1) if _problem(config, n) is None]


def _problem(config: ModelConfig, n: int) -> str | None:
    if config.num_attention_heads % n:
        return f"{config.num_attention_heads} attention heads"
    kv = config.num_key_value_heads
    if kv % n and n % kv:
        return f"{kv} key/value heads"
    if config.intermediate_size % n:
        return f"intermediate size {config.intermediate_size}"
    if config.vocab_size % n:
        return f"vocabulary of {config.vocab_size}"
    return None


def check_tp_size(config: ModelConfig, n: int, source: str = "model") -> None:
    if n < 1:
        raise ConfigError(f"tensor parallel size must be >= 1, got {n}")
    problem = _problem(config, n)
    if problem is not None:
        valid = ", ".join(map(str, valid_tp_sizes(config, max(n, 16))))
        raise ConfigError(f"{source}: tensor parallel size {n} does not divide its {problem} "
                          f"(valid sizes: {valid})")


@dataclass(frozen=True)
class TensorSplit:
    """Rank r of n holds tensor.narrow(axis, start, length); axis None = replicated."""

    axis: int | None
    start: int = 0
    length: int = 0


@dataclass(frozen=True)
class ShardPlan:
    config: ModelConfig  # the full model
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        check_tp_size(self.config, self.world_size)

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

    def split(self, name: str) -> TensorSplit:
        cfg, r, n, d = self.config, self.rank, self.world_size, self.config.head_dim
        if re.search(r"\.q_proj\.(weight|bias)$", name):
            return TensorSplit(0, r * self.heads * d, self.heads * d)
        if re.search(r"\.(k_proj|v_proj)\.(weight|bias)$", name):
            if cfg.num_key_value_heads >= n:
                return TensorSplit(0, r * self.kv_heads * d, self.kv_heads * d)
            head = r * cfg.num_key_value_heads // n  # replicated: the KV head this rank's query heads read
            return TensorSplit(0, head * d, d)
        if name.endswith(".o_proj.weight"):
            return TensorSplit(1, r * self.heads * d, self.heads * d)
        if re.search(r"\.(gate_proj|up_proj)\.weight$", name):
            width = cfg.intermediate_size // n
            return TensorSplit(0, r * width, width)
        if name.endswith(".down_proj.weight"):
            width = cfg.intermediate_size // n
            return TensorSplit(1, r * width, width)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            width = cfg.vocab_size // n
            return TensorSplit(0, r * width, width)
        return TensorSplit(None)

    def shard(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        split = self.split(name)
        if split.axis is None:
            return tensor
        return tensor.narrow(split.axis, split.start, split.length)
