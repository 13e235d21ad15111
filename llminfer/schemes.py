"""The names configs accept and the CLI offers, without importing torch (the CLI parses before it loads).

Each table here is the one list its names come from: config validation, `--help` choices and error
messages all read it. A quantization scheme's behaviour (layer, packing, tensor-parallel split, export) is its
method class in `llminfer.quantization.methods`, registered under the same name.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # compute dtypes of a network
KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's dtype (or what a quantized checkpoint recorded)


@dataclass(frozen=True)
class Scheme:
    name: str
    weight_dtype: str
    act_dtype: str | None  # None: activations stay in the compute dtype
    group_sizes: tuple[int, ...] = ()  # grouped schemes: the inputs per scale/zero group they support
    algorithms: tuple[str, ...] = ("rtn",)
    exportable: bool = False  # `llminfer export --quantization` lowers it to ONNX


QUANTIZATION_SCHEMES = {scheme.name: scheme for scheme in (
    Scheme("a16w8", "int8", None, exportable=True),
    Scheme("a16w4", "int4", None, group_sizes=(32, 64, 128), algorithms=("rtn", "gptq")),
    Scheme("a8w8", "int8", "int8", algorithms=("rtn", "smoothquant")),
)}
ALGORITHMS = tuple(dict.fromkeys(a for s in QUANTIZATION_SCHEMES.values() for a in s.algorithms))
