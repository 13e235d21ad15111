"""A quantization scheme as the LayerFactory sees it: which projections it covers and the empty layer it builds.

    layers = LayerFactory(ops, quantization=QuantizationMethod(config))

The scheme's behaviour lives in its layer class (llminfer.quantization.layers, registered by scheme name);
its names, dtypes and group sizes in llminfer.schemes.
"""

from __future__ import annotations

from dataclasses import replace

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

    def create_lm_head(self, in_features: int, out_features: int, ops: OpSet) -> nn.Module | None:
        """The LM head: in the scheme when the config quantizes it, else int8 per channel (A16W8) unless the config
        keeps it in the compute dtype (None: a float head)."""
        if self.covers("lm_head"):
            return self.create_layer(in_features, out_features, False, ops)
        if self.config.int8_lm_head:
            return QUANTIZED_LAYERS["a16w8"].empty(in_features, out_features, False, int8_lm_head_config(self.config),
                                                   ops)
        return None


def int8_lm_head_config(config: QuantizationConfig) -> QuantizationConfig:
    """What an int8 LM head beside another scheme is: A16W8 in the same compute dtype."""
    return replace(config, scheme="a16w8", group_size=None, algorithm="rtn", smoothing=False, calibration=None)
