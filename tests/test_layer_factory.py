"""The LayerFactory builds each projection by its role: float or quantized, whole or one rank's share, and the
layer itself says which part of a checkpoint tensor it holds and combines the ranks' results."""

import pytest
import torch

from llminfer.config import ModelConfig, QuantizationConfig
from llminfer.layers.factory import LayerFactory
from llminfer.layers.linear import Linear, MergedLinear
from llminfer.ops import resolve_ops
from llminfer.parallel.sharding import ShardPlan
from llminfer.quantization.layers import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear
from llminfer.quantization.methods import QuantizationMethod

OPS = resolve_ops(None, "cpu")
CONFIG = ModelConfig("llama", 256, 64, 128, 2, 8, 2, 8, 128)


class TwoRanksInOneProcess:
    """Collectives over two ranks simulated in one process: rank 0's contribution is held aside and combined
    with rank 1's when rank 1 calls (rank 0 runs first)."""

    def __init__(self) -> None:
        self.pending = []

    def all_reduce(self, tensor, op="sum"):
        if not self.pending:
            self.pending.append(tensor.clone())
            return
        other = self.pending.pop()
        tensor.copy_(other + tensor if op == "sum" else torch.maximum(other, tensor))

    def all_gather_last(self, tensor):
        raise AssertionError("not used here")


def test_without_a_plan_the_roles_build_plain_layers_that_know_their_prefix():
    layers = LayerFactory(OPS)
    qkv = layers.merged_column("m.qkv_proj", 64, {"q": (64, "heads"), "k": (16, "kv_heads"), "v": (16, "kv_heads")})
    down = layers.row("m.down_proj", 128, 64, split_by="intermediate", bias=True)
    assert type(qkv) is MergedLinear and qkv.out_features == 96 and qkv.parts == ("q", "k", "v")
    assert type(down) is Linear and (down.prefix, down.role, down.parallel) == ("m.down_proj", "row", None)
    assert down.tensor_split("weight").axis is None  # one process: every tensor whole
    assert layers.replicated("m.gate", 64, 4).role == "replicated"


@pytest.mark.parametrize("config,layer_class", [
    (QuantizationConfig("a16w8"), Int8WeightOnlyLinear),
    (QuantizationConfig("a16w4", group_size=32), Int4WeightOnlyLinear),
    (QuantizationConfig("a8w8"), Int8DynamicLinear),
])
def test_a_quantization_method_builds_its_schemes_layer_for_projections_only(config, layer_class):
    layers = LayerFactory(OPS, QuantizationMethod(config))
    assert type(layers.column("m.up", 64, 128, "intermediate")) is layer_class
    assert type(layers.row("m.down", 128, 64, "intermediate")) is layer_class
    assert type(layers.lm_head("lm_head", 64, 256)) is Int8WeightOnlyLinear  # int8 beside any scheme...
    kept_float = QuantizationConfig(config.scheme, config.group_size, int8_lm_head=False)
    assert type(LayerFactory(OPS, QuantizationMethod(kept_float)).lm_head("lm_head", 64, 256)) is Linear  # ...or not
    assert type(layers.replicated("m.gate", 64, 4)) is Linear
    with_head = LayerFactory(OPS, QuantizationMethod(QuantizationConfig(config.scheme, config.group_size,
                                                                        quantize_lm_head=True)))
    assert type(with_head.lm_head("lm_head", 64, 256)) is layer_class


def test_a_row_parallel_layer_sums_the_ranks_partial_products_then_adds_its_bias_once():
    torch.manual_seed(0)
    full = torch.nn.Linear(128, 64)
    x = torch.randn(5, 128)
    collectives = TwoRanksInOneProcess()
    outputs = []
    for rank in range(2):
        layers = LayerFactory(OPS, plan=ShardPlan(CONFIG, rank, 2), collectives=collectives)
        down = layers.row("model.layers.0.mlp.down_proj", 64, 64, split_by="intermediate", bias=True)
        with torch.no_grad():
            down.weight.copy_(down.tensor_split("weight").take(full.weight))
            down.bias.copy_(down.tensor_split("bias").take(full.bias))
        columns = down.tensor_split("weight").ranges[0]
        outputs.append(down(x[:, columns[0]:columns[0] + columns[1]]))
    torch.testing.assert_close(outputs[1], full(x).detach(), rtol=1e-5, atol=1e-5)


def test_a_column_parallel_fused_projection_takes_each_parts_rows():
    collectives = TwoRanksInOneProcess()
    layers = LayerFactory(OPS, plan=ShardPlan(CONFIG, 1, 2), collectives=collectives)
    qkv = layers.merged_column("m.qkv_proj", 64, {"q": (32, "heads"), "k": (8, "kv_heads"), "v": (8, "kv_heads")})
    assert qkv.tensor_split("weight", "q").ranges == ((32, 32),)  # q_proj stored apart: its own rows
    assert qkv.tensor_split("weight", "k").ranges == ((8, 8),)
    assert qkv.tensor_split("weight").ranges == ((32, 32), (72, 8), (88, 8))  # stored fused: after the parts before


def test_every_scheme_name_has_exactly_one_layer_class_and_exportable_means_it_lowers():
    from llminfer.errors import UnsupportedModelError
    from llminfer.quantization.layers import QUANTIZED_LAYERS
    from llminfer.schemes import QUANTIZATION_SCHEMES

    assert set(QUANTIZED_LAYERS) == set(QUANTIZATION_SCHEMES)
    for name, scheme in QUANTIZATION_SCHEMES.items():
        group = scheme.group_sizes[0] if scheme.group_sizes else None
        layer = QUANTIZED_LAYERS[name].empty(64, 8, False, QuantizationConfig(name, group), OPS)
        if scheme.exportable:
            assert not isinstance(layer.for_export(), type(layer))
        else:
            with pytest.raises(UnsupportedModelError, match=f"{name} layers cannot be exported"):
                layer.for_export()
