"""The LayerFactory: model files ask for each projection by its role; the run decides what is built.

Built once per run from the op implementations, the quantization method (or None) and the tensor-parallel plan
(or None), and passed down to the model's constructor:

    self.qkv_proj = layers.merged_column(f"{prefix}.qkv_proj", hidden, {"q": (q, "heads"), "k": (kv, "kv_heads"),
                                                                         "v": (kv, "kv_heads")}, bias=True)
    self.o_proj = layers.row(f"{prefix}.o_proj", q, hidden, split_by="heads")

Float or quantized, one process or one rank of N: the model file is the same. Sizes given are this rank's
(the network of a rank is built from the plan's rank config); `split_by` names the dimension the plan divides,
so that each layer knows which rows or columns of the full checkpoint tensor it holds.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from llminfer.layers.embedding import VocabParallelEmbedding
from llminfer.layers.linear import Linear, MergedLinear
from llminfer.layers.parallel import Collectives, Parallel, TensorParallelPlan
from llminfer.ops import OpSet


class QuantizationMethod(Protocol):
    """What the factory needs of a quantization scheme (llminfer.quantization.methods)."""

    def covers(self, role: str) -> bool:
        """Whether a projection of this role ('column', 'row', 'lm_head') is quantized."""

    def create_layer(self, in_features: int, out_features: int, bias: bool, ops: OpSet) -> nn.Module:
        """An empty quantized layer, filled from a quantized checkpoint."""

    def create_lm_head(self, in_features: int, out_features: int, ops: OpSet) -> nn.Module | None:
        """The quantized LM head of this scheme's checkpoints, or None where it is kept float."""


class LayerFactory:
    def __init__(self, ops: OpSet, quantization: QuantizationMethod | None = None,
                 plan: TensorParallelPlan | None = None, collectives: Collectives | None = None) -> None:
        if (plan is None) != (collectives is None):
            raise ValueError("a tensor-parallel plan needs its collectives, and collectives a plan")
        self.ops, self.quantization = ops, quantization
        self.plan, self.collectives = plan, collectives

    def column(self, prefix: str, in_features: int, out_features: int, split_by: str,
               bias: bool = False) -> nn.Module:
        """Output rows split across ranks (no communication)."""
        return self._projection(prefix, "column", in_features, {None: (out_features, split_by)}, bias)

    def merged_column(self, prefix: str, in_features: int, parts: dict[str | int, tuple[int, str]],
                      bias: bool = False) -> nn.Module:
        """Several column-parallel projections of the same input in one matmul (q|k|v, gate|up); `parts` gives
        each part's (width, split_by) in output order. Checkpoints store the parts apart or already fused."""
        return self._projection(prefix, "column", in_features, parts, bias)

    def row(self, prefix: str, in_features: int, out_features: int, split_by: str, bias: bool = False) -> nn.Module:
        """Input columns split across ranks: partial products are summed over them."""
        return self._projection(prefix, "row", in_features, {None: (out_features, split_by)}, bias)

    def replicated(self, prefix: str, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        """Every rank holds the whole projection (small ones not worth splitting); never quantized."""
        layer = Linear(in_features, out_features, bias, self.ops)
        layer.prefix, layer.role = prefix, "replicated"
        return layer

    def embedding(self, prefix: str, vocab_size: int, hidden_size: int) -> nn.Module:
        if self.plan is None:
            layer = nn.Embedding(vocab_size, hidden_size)
        else:
            layer = VocabParallelEmbedding(vocab_size // self.plan.world_size, hidden_size, self._vocab_share())
        layer.prefix = prefix
        return layer

    def lm_head(self, prefix: str, hidden_size: int, vocab_size: int) -> nn.Module:
        """Logits over the vocabulary; a rank computes its slice and the slices are gathered."""
        rows = vocab_size if self.plan is None else vocab_size // self.plan.world_size
        layer = self.quantization.create_lm_head(hidden_size, rows, self.ops) if self.quantization else None
        if layer is None:
            layer = Linear(hidden_size, rows, ops=self.ops)
        if self.plan is not None:
            layer.parallel = self._vocab_share()
        layer.prefix, layer.role = prefix, "lm_head"
        return layer

    def _projection(self, prefix: str, role: str, in_features: int, parts: dict[str | int | None, tuple[int, str]],
                    bias: bool) -> nn.Module:
        out_features = sum(width for width, _ in parts.values())
        if self.quantization is not None and self.quantization.covers(role):
            layer = self.quantization.create_layer(in_features, out_features, bias, self.ops)
        elif list(parts) == [None]:
            layer = Linear(in_features, out_features, bias, self.ops)
        else:
            layer = MergedLinear(in_features, {name: width for name, (width, _) in parts.items()}, bias, self.ops)
        if self.plan is not None:
            layer.parallel = self._share(role, [split_by for _, split_by in parts.values()])
        layer.prefix, layer.role = prefix, role
        return layer

    def _share(self, role: str, split_by: list[str]) -> Parallel:
        """This rank's ranges of the full tensor: for each part, its rows (after the full widths of the parts
        before it); for a row-parallel layer, its input columns."""
        plan = self.plan
        if role == "row":
            return Parallel(role, (plan.share(split_by[0]),), self.collectives)
        part_ranges = tuple(plan.share(dimension) for dimension in split_by)
        ranges, offset = [], 0
        for dimension, (start, length) in zip(split_by, part_ranges):
            ranges.append((offset + start, length))
            offset += plan.full_width(dimension)
        return Parallel(role, tuple(ranges), self.collectives, part_ranges)

    def _vocab_share(self) -> Parallel:
        return Parallel("vocab", (self.plan.share("vocab"),), self.collectives)
