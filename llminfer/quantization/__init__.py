"""Post-training quantization: A16W8, A16W4, A8W8 linear layers and an int8 KV cache.

    from llminfer.quantization import PTQConfig, RTN, GPTQ, save_quantized
"""

from llminfer.quantization.config import PTQConfig, QuantizationConfig
from llminfer.quantization.ptq import GPTQ, RTN, PostTrainingQuantizer, quantizer_for
from llminfer.quantization.save import save_quantized

__all__ = ["GPTQ", "PTQConfig", "PostTrainingQuantizer", "QuantizationConfig", "RTN", "quantizer_for",
           "save_quantized"]
