"""What a quantized checkpoint is (QuantizationConfig, saved beside the weights) and what the user asks the
post-training quantizer for (PTQConfig)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from llminfer.config import DTYPES, KV_CACHE_DTYPES
from llminfer.errors import ConfigError

# scheme -> (weight dtype, activation dtype at run time; None = the compute dtype)
SCHEMES = {"a16w8": ("int8", None), "a16w4": ("int4", None), "a8w8": ("int8", "int8")}
ALGORITHMS = ("rtn", "gptq", "smoothquant")
MANIFEST_FILE = "quantization.json"


def scheme_for(weight_dtype: str, act_dtype: str | None) -> str:
    for scheme, dtypes in SCHEMES.items():
        if dtypes == (weight_dtype, act_dtype):
            return scheme
    raise ConfigError(f"weight_dtype={weight_dtype!r} with act_dtype={act_dtype!r} is not a supported scheme "
                      f"(supported: int8 weights with act_dtype None or 'int8', int4 weights with act_dtype None)")


@dataclass(frozen=True)
class QuantizationConfig:
    """How a checkpoint's linear layers are quantized; the layers build themselves from it."""

    scheme: str  # a16w8 | a16w4 | a8w8
    group_size: int | None = None  # a16w4: inputs per scale/zero group
    algorithm: str = "rtn"
    compute_dtype: str = "bfloat16"  # activations, embeddings, norms, biases, LM head
    kv_cache_dtype: str = "auto"  # "int8": the engine stores keys/values as int8 unless told otherwise
    quantize_lm_head: bool = False
    smoothing: bool = False  # a8w8: per-input-channel factors migrate activation outliers into the weights
    calibration: dict[str, Any] | None = None  # source, sha256, tokens

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown quantization scheme '{self.scheme}' (expected one of {', '.join(SCHEMES)})")
        if self.scheme == "a16w4":
            if self.group_size not in (32, 64, 128):
                raise ConfigError(f"a16w4 needs a group size of 32, 64 or 128, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ConfigError(f"group size applies to a16w4 only; {self.scheme} is quantized per output channel")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm '{self.algorithm}' (expected one of {', '.join(ALGORITHMS)})")
        if self.algorithm == "gptq" and self.scheme != "a16w4":
            raise ConfigError(f"algorithm 'gptq' is implemented for a16w4, not {self.scheme}")
        if (self.algorithm == "smoothquant") != self.smoothing or (self.smoothing and self.scheme != "a8w8"):
            raise ConfigError("algorithm 'smoothquant' applies to a8w8 only")
        if self.compute_dtype not in DTYPES:
            raise ConfigError(f"compute dtype '{self.compute_dtype}' is not supported "
                              f"(expected one of {', '.join(DTYPES)})")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv cache dtype '{self.kv_cache_dtype}' is not supported "
                              f"(expected one of {', '.join(KV_CACHE_DTYPES)})")

    @property
    def weight_dtype(self) -> str:
        return SCHEMES[self.scheme][0]

    @property
    def act_dtype(self) -> str | None:
        return SCHEMES[self.scheme][1]

    def describe(self) -> str:
        group = f", group {self.group_size}" if self.group_size else ""
        return f"{self.scheme} ({self.algorithm}{group})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "quantization config") -> "QuantizationConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
        if "scheme" not in data:
            raise ConfigError(f"{source}: missing required field 'scheme'")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


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
    quantize_lm_head: bool = False
    smoothquant_alpha: float = 0.5  # migration strength: 0 keeps activations as they are, 1 moves all into W
    gptq_damp: float = 0.01  # fraction of the mean Hessian diagonal added for stability
    calibration_tokens: int = 16384
    calibration_window: int = 512

    def __post_init__(self) -> None:
        if self.mode != "quantize":
            raise ConfigError(f"PTQConfig mode '{self.mode}' is not supported (expected 'quantize')")
        if self.weight_dtype not in ("int8", "int4"):
            raise ConfigError(f"weight_dtype '{self.weight_dtype}' is not supported (expected 'int8' or 'int4')")
        if self.kv_dtype not in (None, "int8"):
            raise ConfigError(f"kv_dtype '{self.kv_dtype}' is not supported (expected None or 'int8')")
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ConfigError(f"smoothquant_alpha must be in [0, 1], got {self.smoothquant_alpha}")
        self.quantization_config()  # validates the combination

    @property
    def scheme(self) -> str:
        return scheme_for(self.weight_dtype, self.act_dtype)

    def quantization_config(self, calibration: dict[str, Any] | None = None) -> QuantizationConfig:
        return QuantizationConfig(scheme=self.scheme, group_size=self.group_size, algorithm=self.algorithm,
                                  compute_dtype=self.compute_dtype, kv_cache_dtype=self.kv_dtype or "auto",
                                  quantize_lm_head=self.quantize_lm_head,
                                  smoothing=self.algorithm == "smoothquant", calibration=calibration)

    @classmethod
    def for_scheme(cls, scheme: str, **kwargs: Any) -> "PTQConfig":
        if scheme not in SCHEMES:
            raise ConfigError(f"unknown quantization scheme '{scheme}' (expected one of {', '.join(SCHEMES)})")
        weight_dtype, act_dtype = SCHEMES[scheme]
        return cls(weight_dtype=weight_dtype, act_dtype=act_dtype, **kwargs)
