"""How a checkpoint splits across tensor-parallel ranks (Megatron-style).

Column-parallel (output rows split): q/k/v, gate/up projections, the embedding and LM head (by vocabulary).
Row-parallel (input columns split, one all-reduce after): o_proj and down_proj. Attention heads follow their
projections; with fewer KV heads than ranks each KV head is replicated on the ranks whose query heads use it.
Norms are replicated. Quantized tensors split with their weights: a fused q|k|v or gate|up projection takes
each part's rows; a row-parallel layer's int4 levels (two per byte) and group scales/zero points split along
the input axis on group boundaries, its per-channel scales are replicated. The same rules serve on-the-fly
splitting at load and the offline `llminfer shard`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from llminfer.config import ModelConfig
from llminfer.errors import ConfigError
from llminfer.quantization.config import QuantizationConfig


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
class TensorSplit:
    """Rank r of n holds the concatenation of tensor.narrow(axis, start, length) for each range;
    axis None = replicated. Fused projections (q|k|v, gate|up) take one range per part."""

    axis: int | None
    ranges: tuple[tuple[int, int], ...] = ()

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return tensor
        parts = [tensor.narrow(self.axis, start, length) for start, length in self.ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.axis)


_COLUMN_PARALLEL = re.compile(r"\.(q_proj|k_proj|v_proj|qkv_proj|gate_proj|up_proj|gate_up_proj)\.")
_ROW_PARALLEL = re.compile(r"\.(o_proj|down_proj)\.")
_VOCAB = ("model.embed_tokens.", "lm_head.")


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

    def _output_rows(self, projection: str) -> list[tuple[int, int]]:
        """This rank's output rows of a column-parallel projection, one range per part of a fused one."""
        cfg, r, n, d = self.config, self.rank, self.world_size, self.config.head_dim
        q = (r * self.heads * d, self.heads * d)
        if cfg.num_key_value_heads >= n:
            kv = (r * self.kv_heads * d, self.kv_heads * d)
        else:  # replicated: the KV head this rank's query heads read
            kv = (r * cfg.num_key_value_heads // n * d, d)
        width = cfg.intermediate_size // n
        mlp = (r * width, width)
        q_size, kv_size = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        return {"q_proj": [q], "k_proj": [kv], "v_proj": [kv], "gate_proj": [mlp], "up_proj": [mlp],
                "qkv_proj": [q, (q_size + kv[0], kv[1]), (q_size + kv_size + kv[0], kv[1])],
                "gate_up_proj": [mlp, (cfg.intermediate_size + mlp[0], width)]}[projection]

    def _input_columns(self, projection: str) -> tuple[int, int]:
        width = self.heads * self.config.head_dim if projection == "o_proj" else \
            self.config.intermediate_size // self.world_size
        return self.rank * width, width

    def split(self, name: str) -> TensorSplit:
        suffix = name.rpartition(".")[2]
        if (match := _COLUMN_PARALLEL.search(name)) and ".layers." in name:
            if suffix == "smooth":  # a8w8 SmoothQuant: one factor per input, and every rank sees every input
                return TensorSplit(None)
            # weight, bias, and a quantized layer's qweight / scales / zeros all have one row per output
            return TensorSplit(0, tuple(self._output_rows(match.group(1))))
        if (match := _ROW_PARALLEL.search(name)) and ".layers." in name:
            if suffix == "bias" or (suffix == "scales" and self._per_channel()):
                return TensorSplit(None)  # one value per output row: every rank adds / scales the same
            start, length = self._input_columns(match.group(1))
            if suffix == "smooth":  # a8w8 SmoothQuant: one factor per input column
                return TensorSplit(0, ((start, length),))
            per = {"qweight": 2, "scales": self.quantization.group_size, "zeros": self.quantization.group_size} \
                if self.quantization and self.quantization.scheme == "a16w4" else {}
            step = per.get(suffix, 1)  # int4: two levels per byte, one scale per group of inputs
            return TensorSplit(1, ((start // step, length // step),))
        if name.startswith(_VOCAB) and suffix != "bias":
            width = self.config.vocab_size // self.world_size
            return TensorSplit(0, ((self.rank * width, width),))
        return TensorSplit(None)

    def _per_channel(self) -> bool:
        return self.quantization is not None and self.quantization.scheme in ("a16w8", "a8w8")

    def shard(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return self.split(name).take(tensor)
