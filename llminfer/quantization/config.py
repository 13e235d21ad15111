"""What a quantized checkpoint is (QuantizationConfig, saved beside the weights) and what the user asks the
post-training quantizer for (PTQConfig)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llminfer.config import QuantizationConfig, scheme_for
from llminfer.errors import ConfigError
from llminfer.schemes import KV_CACHE_DTYPES, QUANTIZATION_SCHEMES

__all__ = ["PTQConfig", "QuantizationConfig"]

@dataclass(frozen=True)
class PTQConfig:
    """Post-training quantization request, in the shape of the usual PTQ toolkits:

        cfg = PTQConfig(mode="quantize", weight_dtype="int4", group_size=64, act_dtype=None, kv_dtype="int8",
                        algorithm="rtn")
    """

    mode: str = "quantize"
    weight_dtype: str = "int8"  # "int8" | "int4"
    group_size: int | None = None  # int4: 32, 64 or 128
    act_dtype: str | None = None  # None (weight-only) | "int8" (A8W8, dynamic per token)
    kv_dtype: str | None = None  # None | "int8": recorded so the deployed engine stores an int8 KV cache
    algorithm: str = "rtn"  # "rtn" | "gptq" (a16w4) | "smoothquant" (a8w8)
    compute_dtype: str = "bfloat16"
    quantize_lm_head: bool = False  # the LM head quantized with the scheme, and saved so
    int8_lm_head: bool = True  # otherwise the deployed model makes it int8 per channel at load (False: float)
    smoothquant_alpha: float = 0.5  # migration strength: 0 keeps activations as they are, 1 moves all into W
    gptq_damp: float = 0.01  # fraction of the mean Hessian diagonal added for stability
    calibration_tokens: int = 16384
    calibration_window: int = 512

    def __post_init__(self) -> None:
        if self.mode != "quantize":
            raise ConfigError(f"PTQConfig mode '{self.mode}' is not supported (expected 'quantize')")
        if self.weight_dtype not in ("int8", "int4"):
            raise ConfigError(f"weight_dtype '{self.weight_dtype}' is not supported (expected 'int8' or 'int4')")
        if self.kv_dtype is not None and self.kv_dtype not in KV_CACHE_DTYPES[1:]:  # [0] is "auto"
            quantized = " or ".join(repr(d) for d in KV_CACHE_DTYPES[1:])
            raise ConfigError(f"kv_dtype '{self.kv_dtype}' is not supported (expected None or {quantized})")
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ConfigError(f"smoothquant_alpha must be in [0, 1], got {self.smoothquant_alpha}")
        self.quantization_config()  # validates the combination

    @property
    def scheme(self) -> str:
        return scheme_for(self.weight_dtype, self.act_dtype)

    def quantization_config(self, calibration: dict[str, Any] | None = None) -> QuantizationConfig:
        return QuantizationConfig(scheme=self.scheme, group_size=self.group_size, algorithm=self.algorithm,
                                  compute_dtype=self.compute_dtype, kv_cache_dtype=self.kv_dtype or "auto",
                                  quantize_lm_head=self.quantize_lm_head, int8_lm_head=self.int8_lm_head,
                                  smoothing=self.algorithm == "smoothquant", calibration=calibration)

    @classmethod
    def for_scheme(cls, scheme: str, **kwargs: Any) -> "PTQConfig":
        if scheme not in QUANTIZATION_SCHEMES:
            raise ConfigError(f"unknown quantization scheme '{scheme}' "
                              f"(expected one of {', '.join(QUANTIZATION_SCHEMES)})")
        return cls(weight_dtype=QUANTIZATION_SCHEMES[scheme].weight_dtype,
                   act_dtype=QUANTIZATION_SCHEMES[scheme].act_dtype, **kwargs)
