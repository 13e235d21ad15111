"""A quantization scheme as the LayerFactory sees it: which projections it covers and the empty layer it builds.

    layers = LayerFactory(ops, quantization=QuantizationMethod(config))

The scheme's behaviour lives in its layer class (llminfer.quantization.layers, registered by scheme name);
its names, dtypes and group sizes in llminfer.schemes.
"""

from __future__ import annotations

from torch import nn

from llminfer.config import QuantizationConfig
from llminfer.ops import OpSet
from llminfer.quantization.layers import QUANTIZED_LAYERS


class QuantizationMethod:
    def __init__(self, config: QuantizationConfig) -> None:
        self.config = config
        self.layer_class = QUANTIZED_LAYERS[config.scheme]

    def covers(self, role: str | None) -> bool:
        """The decoder layers' projections; the LM head only when the config asks for it (never the embedding)."""
        return role in ("column", "row") or (role == "lm_head" and self.config.quantize_lm_head)

    def create_layer(self, in_features: int, out_features: int, bias: bool, ops: OpSet) -> nn.Module:
        return self.layer_class.empty(in_features, out_features, bias, self.config, ops)
