"""Configuration: what the network is (ModelConfig) and how the engine runs it (EngineConfig).

ModelConfig is built once from whatever the checkpoint carries (an HF config.json, GGUF metadata,
or a YAML/JSON model config file of ours) and validated there; everything else only reads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from llminfer.architectures import ARCHITECTURES, architecture_of, supported_hf_names
from llminfer.errors import ConfigError, UnsupportedModelError
from llminfer.schemes import ALGORITHMS, DTYPE_NAMES, KV_CACHE_DTYPES, QUANTIZATION_SCHEMES

# "freq_factors": per-frequency divisors given as a list (GGUF's rope_freqs tensor), no HF equivalent.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")  # the op each is: silu_and_mul, gelu_tanh_and_mul
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only transformer. Field names follow Hugging Face's config.json; the
    architecture registry (llminfer.architectures) says which fields each model_type reads."""

    model_type: str  # a key of llminfer.architectures.ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    sliding_window: int | None = None  # Mistral: every layer; Gemma 3: the sliding_attention layers
    hidden_act: str = "silu"  # the gated MLP's activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each query and key head before rotary
    layer_types: tuple[str, ...] | None = None  # Gemma 3: "sliding_attention" / "full_attention" per layer
    rope_local_base_freq: float | None = None  # Gemma 3: rope theta of the sliding layers
    query_pre_attn_scalar: float | None = None  # Gemma 3: attention scale is this ** -0.5, not head_dim ** -0.5
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    torch_dtype: str = "float32"  # dtype the checkpoint was stored in

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"model config field '{name}' must be a positive integer, got {value!r}")
        token_ids = [*self.eos_token_id, *([] if self.bos_token_id is None else [self.bos_token_id])]
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in token_ids):
            raise ConfigError(f"model config fields 'bos_token_id' / 'eos_token_id' must be token ids (integers >= 0), "
                              f"got {self.bos_token_id!r} / {list(self.eos_token_id)!r}"[:300])
        for name in ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"model config field '{name}' must be a finite positive number, got {value!r}")
        architecture_of(self.model_type)  # refuses an unknown one, naming the supported
        if self.hidden_act not in HIDDEN_ACTS:
            raise UnsupportedModelError(f"hidden activation '{self.hidden_act}' is not supported "
                                        f"(supported: {', '.join(HIDDEN_ACTS)})")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} "
                                  "layers")
            unknown = set(self.layer_types) - {"sliding_attention", "full_attention"}
            if unknown:
                raise UnsupportedModelError(f"layer type '{sorted(unknown)[0]}' is not supported "
                                            "(supported: sliding_attention, full_attention)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_scaling type '{rope_type}' is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def layer_sliding_window(self, layer: int) -> int | None:
        """The attention window of one layer (None: it sees the whole context)."""
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @property
    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.attention_bias else 0)
        layer = attn + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + h

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config") -> "ModelConfig":
        """Build from a Hugging Face config.json dict; `source` names the file in error messages."""
        try:
            return cls._from_hf_dict(hf, source)
        except (ConfigError, UnsupportedModelError) as exc:  # name the file the bad value came from
            raise exc if str(exc).startswith(source) else type(exc)(f"{source}: {exc}") from None
        except (TypeError, KeyError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as exc:
            # a string where a number belongs, a list where a name does, heads = 0 ...
            raise ConfigError(f"{source}: invalid field value ({type(exc).__name__}: {exc})"[:300]) from None

    @classmethod
    def _from_hf_dict(cls, hf: dict[str, Any], source: str) -> "ModelConfig":
        model_type = _model_type_of(hf, source)
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [name for name in required if name not in hf]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        heads = hf["num_attention_heads"]
        if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
            raise ConfigError(f"model config field 'num_attention_heads' must be a positive integer, got {heads!r}")
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        fields = {"attention_bias": bool(hf.get("attention_bias", False)), "sliding_window": hf.get("sliding_window"),
                  "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
                  "rope_theta": float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta",
                                                                                                 10000.0))),
                  "rope_scaling": _rope_scaling_of(hf)}
        fields.update(ARCHITECTURES[model_type].hf_config(hf, source))
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            **fields,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos_ids,
            torch_dtype=_dtype_name(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The equivalent Hugging Face config.json, so converted folders also load in transformers."""
        architecture = ARCHITECTURES[self.model_type]
        hf = {
            "architectures": [architecture.hf_architectures[0]],
            "model_type": architecture.hf_model_types[0],
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model_type"},
        }
        hf["eos_token_id"] = list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0]
        hf["hidden_activation"] = self.hidden_act  # Gemma's name for it
        hf["use_sliding_window"] = self.sliding_window is not None  # Qwen's switch
        if self.layer_types is not None:
            hf["layer_types"] = list(self.layer_types)
        return hf

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["eos_token_id"] = list(self.eos_token_id)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        _check_fields(cls, data, source)
        data = dict(data)
        data["eos_token_id"] = tuple(data.get("eos_token_id") or ())
        if data.get("layer_types") is not None:
            data["layer_types"] = tuple(data["layer_types"])
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def load_model_config_file(path: str | Path) -> ModelConfig:
    """Read a model config file of ours (YAML or JSON, ModelConfig fields) or an HF config.json."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: model config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    if "architectures" in data or ("model_type" in data and "head_dim" not in data):
        return ModelConfig.from_hf_dict(data, str(path))
    return ModelConfig.from_dict(data, str(path))


@dataclass(frozen=True)
class EngineConfig:
    """How to run a model: precision, device, context and batch limits, KV cache budget."""

    dtype: str = "float32"
    device: str = "cpu"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 64  # sequences in one step
    max_num_batched_tokens: int = 2048  # tokens in one step; longer prompts are prefilled in chunks
    kv_cache_memory: int | float | str | None = None  # "2GiB", bytes, a fraction of free memory, or None (auto)
    block_size: int = 16  # tokens per KV block
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype (or a quantized checkpoint's choice); "int8"
    quantization: str | None = None  # a scheme to quantize a float checkpoint with at load (round-to-nearest)
    ops: Mapping[str, str] = field(default_factory=dict)  # op -> implementation; others: the device's best
    scheduling_policy: str = "fcfs"  # the waiting queue's order (engine.scheduler.QUEUE_POLICIES)
    attention_backend: str = "paged"  # who owns the KV cache and calls the attention ops (ATTENTION_BACKENDS)
    threads: int | None = None  # CPU threads of this run (split among local ranks); None: the cores we may use
    # Run every step through the Python network; by default pure-decode steps on the CPU are recorded once per
    # batch size and replayed from C++ (engine/step_graph.py), for batches of up to max_graph_batch_size
    # sequences (each graph keeps its buffers: ~1 MiB per sequence on SmolLM2; larger batches amortize Python).
    enforce_eager: bool = False
    max_graph_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES and self.dtype != "auto":
            raise ConfigError(f"dtype '{self.dtype}' is not supported (expected auto or one of {', '.join(DTYPES)})")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads must be an integer >= 1, got {self.threads!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_graph_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"device '{self.device}' is not a torch device "
                              "(expected e.g. cpu, cuda, cuda:1)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device '{self.device}' requested, but this torch build sees no CUDA GPU")
        if self.kv_cache_memory is not None:
            parse_memory(self.kv_cache_memory)  # validate early
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype '{self.kv_cache_dtype}' is not supported "
                              f"(expected one of {', '.join(KV_CACHE_DTYPES)})")
        if self.quantization is not None and self.quantization not in QUANTIZATION_SCHEMES:
            raise ConfigError(f"quantization '{self.quantization}' is not supported "
                              f"(expected one of {', '.join(QUANTIZATION_SCHEMES)})")

    def cpu_threads(self, local_processes: int = 1) -> int:
        """Threads for one of `local_processes` processes sharing this machine: `threads` (or every core this
        process may run on, as `os.sched_getaffinity` reports: a container or `taskset` may allow fewer than the
        machine has) divided among them."""
        available = self.threads or available_cores()
        return max(1, available // local_processes)

    def kv_cache_bytes(self) -> int:
        """The KV pool's byte budget: as given, or a share of the device's free memory."""
        if self.kv_cache_memory is None:
            # CPU: a tenth of available RAM, at most 2 GiB; GPU: half of what is free after loading weights.
            free = _free_memory_bytes(self.device)
            return int(free * 0.5) if torch.device(self.device).type == "cuda" else min(2 << 30, free // 10)
        value = parse_memory(self.kv_cache_memory)
        return int(_free_memory_bytes(self.device) * value) if isinstance(value, float) else value


_MEMORY_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_memory(value: int | float | str) -> int | float:
    """'2GiB' / '512MB' / 123456 -> bytes (int); 0.3 or '0.3' -> a fraction of free memory (float)."""
    if isinstance(value, bool):
        raise ConfigError(f"kv_cache_memory {value!r}: expected a size like 2GiB or a fraction like 0.3")
    if isinstance(value, (int, float)) and not isinstance(value, str):
        number, unit = float(value), ("" if isinstance(value, int) else "fraction")
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).upper() not in _MEMORY_UNITS:
            raise ConfigError(f"kv_cache_memory '{value}': expected a size like 2GiB, 512MB or a fraction like 0.3")
        number, unit = float(match.group(1)), match.group(2).upper()
        if not unit and "." in match.group(1):
            unit = "fraction"
    if unit == "fraction":
        if not 0 < number <= 1:
            raise ConfigError(f"kv_cache_memory fraction {number} must be in (0, 1]")
        return number
    if number <= 0:
        raise ConfigError(f"kv_cache_memory must be positive, got {value!r}")
    return int(number * _MEMORY_UNITS[unit])


def _free_memory_bytes(device: str) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30  # unknown platform: assume a modest machine


def _model_type_of(hf: dict[str, Any], source: str) -> str:
    for arch in hf.get("architectures") or ():
        for entry in ARCHITECTURES.values():
            if arch in entry.hf_architectures:
                return entry.model_type
    for entry in ARCHITECTURES.values():
        if hf.get("model_type") in entry.hf_model_types:
            return entry.model_type
    named = (hf.get("architectures") or [hf.get("model_type")])[0]
    if named is None:
        raise ConfigError(f"{source}: missing required field 'architectures' (or 'model_type')")
    raise UnsupportedModelError(f"{source}: architecture '{named}' is not supported "
                                f"(supported: {', '.join(supported_hf_names())})")


def _rope_scaling_of(hf: dict[str, Any]) -> dict[str, Any] | None:
    scaling = hf.get("rope_scaling")
    if scaling is None:  # transformers >= 5 writes rope_parameters instead
        params = hf.get("rope_parameters") or {}
        if params.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        return None
    return dict(scaling) if scaling else None


def _dtype_name(value: Any) -> str:
    name = str(value).replace("torch.", "")
    return name if name in DTYPES else "float32"


QUANTIZATION_MANIFEST = "quantization.json"  # beside a quantized checkpoint's weights


def scheme_for(weight_dtype: str, act_dtype: str | None) -> str:
    for scheme in QUANTIZATION_SCHEMES.values():
        if (scheme.weight_dtype, scheme.act_dtype) == (weight_dtype, act_dtype):
            return scheme.name
    supported = ", ".join(f"{s.weight_dtype} weights with act_dtype {s.act_dtype!r}"
                          for s in QUANTIZATION_SCHEMES.values())
    raise ConfigError(f"weight_dtype={weight_dtype!r} with act_dtype={act_dtype!r} is not a supported scheme "
                      f"(supported: {supported})")


@dataclass(frozen=True)
class QuantizationConfig:
    """How a checkpoint's linear layers are quantized; the layers build themselves from it."""

    scheme: str  # a16w8 | a16w4 | a8w8
    group_size: int | None = None  # a16w4: inputs per scale/zero group
    algorithm: str = "rtn"
    compute_dtype: str = "bfloat16"  # activations, embeddings, norms, biases, LM head
    kv_cache_dtype: str = "auto"  # "int8": the engine stores keys/values as int8 unless told otherwise
    quantize_lm_head: bool = False  # the LM head quantized with the scheme (saved so)
    int8_lm_head: bool = True  # otherwise: made int8 per channel (A16W8) at load; False keeps the compute dtype
    smoothing: bool = False  # a8w8: per-input-channel factors migrate activation outliers into the weights
    calibration: dict[str, Any] | None = None  # source, sha256, tokens

    def __post_init__(self) -> None:
        scheme = QUANTIZATION_SCHEMES.get(self.scheme)
        if scheme is None:
            raise ConfigError(f"unknown quantization scheme '{self.scheme}' "
                              f"(expected one of {', '.join(QUANTIZATION_SCHEMES)})")
        if scheme.group_sizes:
            if self.group_size not in scheme.group_sizes:
                raise ConfigError(f"{self.scheme} needs a group size of {_one_of(scheme.group_sizes)}, "
                                  f"got {self.group_size!r}")
        elif self.group_size is not None:
            grouped = [s.name for s in QUANTIZATION_SCHEMES.values() if s.group_sizes]
            raise ConfigError(f"group size applies to {', '.join(grouped)} only; {self.scheme} is quantized per "
                              "output channel")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm '{self.algorithm}' (expected one of {', '.join(ALGORITHMS)})")
        if self.algorithm not in scheme.algorithms:
            implemented = [s.name for s in QUANTIZATION_SCHEMES.values() if self.algorithm in s.algorithms]
            raise ConfigError(f"algorithm '{self.algorithm}' is implemented for {', '.join(implemented)} only, "
                              f"not {self.scheme}")
        if (self.algorithm == "smoothquant") != self.smoothing:
            raise ConfigError("smoothing is what algorithm 'smoothquant' does: set both or neither")
        if self.compute_dtype not in DTYPES:
            raise ConfigError(f"compute dtype '{self.compute_dtype}' is not supported "
                              f"(expected one of {', '.join(DTYPES)})")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv cache dtype '{self.kv_cache_dtype}' is not supported "
                              f"(expected one of {', '.join(KV_CACHE_DTYPES)})")

    @property
    def weight_dtype(self) -> str:
        return QUANTIZATION_SCHEMES[self.scheme].weight_dtype

    @property
    def act_dtype(self) -> str | None:
        return QUANTIZATION_SCHEMES[self.scheme].act_dtype

    def describe(self) -> str:
        group = f", group {self.group_size}" if self.group_size else ""
        return f"{self.scheme} ({self.algorithm}{group})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "quantization config") -> "QuantizationConfig":
        data = {"int8_lm_head": False, **data}  # saved before int8 LM heads: its head is stored float
        _check_fields(cls, data, source)
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None




def _one_of(values) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]


def _check_fields(cls: type, data: Mapping[str, Any], source: str) -> None:
    """A config dict names only the dataclass's fields, and every required one."""
    fields = dataclasses.fields(cls)
    unknown = sorted(set(data) - {f.name for f in fields})
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
    missing = [f.name for f in fields
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1
