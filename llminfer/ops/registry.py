"""The operator registry: each op a kernel may replace has one signature, a plain-PyTorch reference, and
named alternatives. Which implementation runs is configuration (`EngineConfig.ops`, `--ops name=impl`),
resolved once per model into an `OpSet` that the layers hold; the model file only ever calls the op.

Every implementation is also registered as a `torch.library` custom op, `torch.ops.llminfer.<op>_<impl>`,
so that `torch.compile` treats it as one opaque call. In eager mode the OpSet calls the Python function
directly: the dispatcher round trip costs ~8 us a call, a few percent of a small model's decode step.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from llminfer.errors import ConfigError
from llminfer.ops import recording

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Implementation:
    name: str
    fn: Callable[..., Any]
    devices: tuple[str, ...]  # device types it runs on
    priority: int  # the default is the available implementation with the highest priority
    requirement: Callable[[], str | None]  # None when usable on this machine, else why not
    custom_op: Any  # the torch.library op wrapping fn
    weight_layout: str | None = None  # for ops on packed weights: the layout it reads, packed at load by the layer
    # Its computation depends only on its tensors' contents and on shapes, dtypes and constant arguments, so that
    # a recorded pass may replay it (ops/recording.py).
    capturable: bool = False

    def unavailable_reason(self, device_type: str) -> str | None:
        if device_type not in self.devices:
            return f"runs on {', '.join(self.devices)}, not {device_type}"
        return self.requirement()


@dataclass
class Op:
    name: str
    doc: str  # the signature, with shapes
    mutates: tuple[str, ...]  # arguments written in place
    fake: Callable[..., Any] | None  # output shapes without computing (for torch.compile)
    implementations: dict[str, Implementation] = field(default_factory=dict)


OPS: dict[str, Op] = {}


def define_op(name: str, doc: str, mutates: tuple[str, ...] = (),
              fake: Callable[..., Any] | None = None) -> Op:
    if name in OPS:
        raise ValueError(f"op '{name}' is defined twice")
    OPS[name] = Op(name, doc, mutates, fake)
    return OPS[name]


def _always() -> str | None:
    return None


def implement(op_name: str, impl_name: str, *, devices: tuple[str, ...] = ("cpu", "cuda"), priority: int = 0,
              requirement: Callable[[], str | None] = _always,
              weight_layout: str | None = None, capturable: bool = False) -> Callable[[Callable], Callable]:
    """Register `fn` as implementation `impl_name` of `op_name` (and as torch.ops.llminfer.<op>_<impl>).
    `weight_layout` names the packing of the weights it reads, for ops whose layers pack them at load;
    `capturable` says that a recorded pass may replay it (Implementation.capturable)."""
    op = OPS[op_name]

    def register(fn: Callable) -> Callable:
        if impl_name in op.implementations:
            raise ValueError(f"op '{op_name}' already has an implementation '{impl_name}'")
        custom = torch.library.custom_op(f"llminfer::{op_name}_{impl_name}", fn, mutates_args=op.mutates)
        if op.fake is not None:
            custom.register_fake(op.fake)
        op.implementations[impl_name] = Implementation(impl_name, fn, devices, priority, requirement, custom,
                                                       weight_layout, capturable)
        return fn

    return register


def parse_ops_spec(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """'rms_norm=reference,paged_decode_attention=batched' (or a mapping) -> {op: implementation}, checked
    against the registry."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        pairs = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, impl = item.partition("=")
            if not sep or not name.strip() or not impl.strip():
                raise ConfigError(f"ops '{item}': expected OP=IMPLEMENTATION (e.g. rms_norm=reference)")
            pairs[name.strip()] = impl.strip()
        spec = pairs
    chosen = dict(spec)
    for name, impl in chosen.items():
        if name not in OPS:
            raise ConfigError(f"ops: unknown op '{name}' (known: {', '.join(sorted(OPS))})")
        if impl not in OPS[name].implementations:
            raise ConfigError(f"ops: op '{name}' has no implementation '{impl}' "
                              f"(implementations: {', '.join(OPS[name].implementations)})")
    return chosen


class OpSet:
    """The implementation of every op chosen for one device: `ops.rms_norm(x, weight, eps)`."""

    def __init__(self, chosen: Mapping[str, Implementation]) -> None:
        self.chosen = dict(chosen)
        for name, impl in self.chosen.items():
            setattr(self, name, _bind(name, impl))

    def __repr__(self) -> str:
        return "OpSet(" + ", ".join(f"{name}={impl.name}" for name, impl in self.chosen.items()) + ")"

    def names(self) -> dict[str, str]:
        return {name: impl.name for name, impl in self.chosen.items()}

    def weight_layout(self, name: str) -> str | None:
        """The weight layout the chosen implementation of op `name` reads (what its layers pack at load)."""
        return self.chosen[name].weight_layout


def _bind(op_name: str, impl: Implementation) -> Callable[..., Any]:
    fn, custom = impl.fn, impl.custom_op

    def call(*args: Any, **kwargs: Any) -> Any:
        if recording.active is not None:
            recording.active.check_implementation(op_name, impl)
        # One opaque node in a torch.compile graph; an export (ONNX) traces through to plain tensor operations.
        if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            return custom(*args, **kwargs)
        return fn(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"{fn.__name__}[{impl.name}]"
    return call


def resolve_ops(spec: str | Mapping[str, str] | None, device: str | torch.device = "cpu") -> OpSet:
    """Each op's implementation for `device`: the one asked for (refused by name if it cannot run here),
    else the highest-priority one that can (a better one that cannot is skipped with one log line)."""
    asked = parse_ops_spec(spec)
    device_type = torch.device(device).type
    chosen: dict[str, Implementation] = {}
    for name, op in OPS.items():
        if name in asked:
            impl = op.implementations[asked[name]]
            reason = impl.unavailable_reason(device_type)
            if reason is not None:
                raise ConfigError(f"ops: {name}={impl.name} is not available here: {reason}")
            chosen[name] = impl
            continue
        for impl in sorted(op.implementations.values(), key=lambda i: -i.priority):
            reason = impl.unavailable_reason(device_type)
            if reason is None:
                chosen[name] = impl
                break
            if device_type in impl.devices:  # meant for this device but missing (no compiler, no ISA): say so
                logger.info("op %s: skipping implementation '%s' (%s)", name, impl.name, reason)
        else:
            raise ConfigError(f"ops: no implementation of '{name}' runs on {device_type}")
    return OpSet(chosen)


def reference_ops(device: str | torch.device = "cpu") -> OpSet:
    """The plain-PyTorch reference of every op that has one (what an export traces), the default elsewhere."""
    return resolve_ops({name: "reference" for name, op in OPS.items() if "reference" in op.implementations}, device)


def describe_ops(device: str | torch.device = "cpu", spec: str | Mapping[str, str] | None = None
                 ) -> list[dict[str, Any]]:
    """For `llminfer info --ops`: every op, its implementations, which run here and which is chosen."""
    chosen = resolve_ops(spec, device).names()
    device_type = torch.device(device).type
    rows = []
    for name, op in OPS.items():
        impls = [{"name": impl.name, "priority": impl.priority,
                  "unavailable": impl.unavailable_reason(device_type)} for impl in op.implementations.values()]
        rows.append({"op": name, "doc": op.doc, "implementations": impls, "chosen": chosen[name]})
    return rows


@functools.lru_cache(maxsize=None)
def default_ops(device_type: str = "cpu") -> OpSet:
    """The default choice for a device, for layers built on their own (tests, analysis) rather than by a model
    that was handed its OpSet."""
    return resolve_ops(None, device_type)
