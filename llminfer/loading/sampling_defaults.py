"""Sampling defaults a user would expect: the model's own (its generation_config.json, or a GGUF's
general.sampling.* keys) when it has them, as vLLM does; otherwise llama.cpp's, for the CLI and the chat page.
(The server applies only the model's own to fields a request leaves out, see `llminfer serve
--generation-config`; a request that names nothing there gets OpenAI's defaults, as with vLLM.)"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llminfer.errors import ConfigError
from llminfer.files import read_json_object

# llama.cpp's sampling defaults (common/common.h): what a model without its own sampling config gets.
LLAMA_CPP_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}

# SamplingParams field -> (generation_config.json key, GGUF metadata key)
FIELDS = {"temperature": ("temperature", "general.sampling.temp"), "top_k": ("top_k", "general.sampling.top_k"),
          "top_p": ("top_p", "general.sampling.top_p"), "min_p": ("min_p", "general.sampling.min_p"),
          "repetition_penalty": ("repetition_penalty", "general.sampling.penalty_repeat")}


def from_generation_config(config: dict[str, Any], source: str) -> dict[str, float | int]:
    """The sampling fields of a Hugging Face generation_config.json (`do_sample: false` means greedy)."""
    defaults = _checked({field: config[key] for field, (key, _) in FIELDS.items() if key in config}, source)
    if config.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


def from_gguf_metadata(metadata: dict[str, Any], source: str) -> dict[str, float | int]:
    return _checked({field: metadata[key] for field, (_, key) in FIELDS.items() if key in metadata}, source)


def _checked(values: dict[str, Any], source: str) -> dict[str, float | int]:
    for field, value in values.items():
        integer = field == "top_k"
        ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{source}: sampling default '{FIELDS[field][0]}' must be a finite number >= 0"
                              f"{' (an integer)' if integer else ''}, got {value!r}")
    return {field: (int(v) if field == "top_k" else float(v)) for field, v in values.items()}


def read_generation_config(folder: Path) -> dict[str, float | int]:
    file = folder / "generation_config.json"
    return from_generation_config(read_json_object(file), str(file)) if file.is_file() else {}


def as_generation_config(defaults: dict[str, float | int]) -> dict[str, float | int]:
    """Sampling defaults written back as generation_config.json keys (a converted folder keeps them)."""
    return {FIELDS[field][0]: value for field, value in defaults.items()}


def cli_defaults(model_defaults: dict[str, float | int]) -> dict[str, float | int]:
    """What the CLI and the chat page start from: the model's own defaults, else llama.cpp's."""
    return dict(model_defaults) if model_defaults else dict(LLAMA_CPP_DEFAULTS)
