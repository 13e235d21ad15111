"""The operator API. Each op has one signature, a plain-PyTorch reference and a registry of alternatives;
models and attention backends call `ops.<name>(...)` on the `OpSet` resolved for their device.

Importing this package registers every op (norm, activation, rotary, linear, attention)."""

from llminfer.ops import activation, attention, linear, norm, rotary  # noqa: F401 - registers the ops
from llminfer.ops.registry import (
    OPS,
    OpSet,
    default_ops,
    describe_ops,
    implement,
    parse_ops_spec,
    reference_ops,
    resolve_ops,
)

__all__ = ["OPS", "OpSet", "default_ops", "describe_ops", "implement", "parse_ops_spec", "reference_ops",
           "resolve_ops"]
