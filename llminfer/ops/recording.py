"""Recording a forward pass as a graph that C++ replays without Python (the CPU analogue of a CUDA graph; the
engine's use: llminfer/engine/step_graph.py).

While a `Recorder` is active, the pass runs as usual and every computation it does becomes one node of a
`StepGraph` (ops/csrc/step_graph.cpp), bound to the very tensors it read and wrote:
- a call of one of our kernels (`cpu_kernels.kernels().<name>(...)`): replayed by the kernel's form that writes
  into the recorded outputs;
- any other PyTorch operator (an embedding lookup, a bias add, a reference op): replayed through the dispatcher,
  its result copied into the recorded output (views and allocations need no node: their storage is fixed).

A replay is only right if nothing in the pass depended on values outside those tensors. So the recorder refuses
(`RecordingError`, the caller runs eagerly) what would bake a value in: an op implementation not declared
`capturable` (its Python may read lists or call `.tolist()`, which no hook sees), a tensor built from Python
values (`torch.tensor`), and a tensor read back into Python (`.item()`, `int(t)`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

# Allocations: their contents are written by a later node, so the recorded storage serves every replay.
_ALLOCATIONS = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
                aten.new_empty.default}
# Values that would be frozen at their recorded state.
_REFUSED = {aten.lift_fresh.default: "a tensor built from Python values",
            aten.lift_fresh_copy.default: "a tensor built from Python values",
            aten._local_scalar_dense.default: "a tensor value read into Python (.item(), int())"}


def _refusal(func: Any, args: tuple) -> str | None:
    """Why a replay of this operator could differ from what recording it saw, or None."""
    if func in _REFUSED:
        return _REFUSED[func]
    if torch.Tag.data_dependent_output in func.tags:
        return "an output read into Python"
    if torch.Tag.dynamic_output_shape in func.tags:
        # indexing by integer tensors has the indices' shape; by a mask, as many rows as it selects
        integer_indices = func is aten.index.Tensor and all(
            i is None or not (i.dtype.is_floating_point or i.dtype in (torch.bool, torch.uint8)) for i in args[1])
        if not integer_indices:
            return "an output whose shape depends on values"
    return None


class RecordingError(RuntimeError):
    """The pass did something a replay could not repeat; the message says what."""


active: "Recorder | None" = None  # the recorder of the pass being recorded (read by the registry and the kernels)


def _storages(tensors: list[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


class Recorder(TorchDispatchMode):
    """`with Recorder(graph): out = model(...)` runs the pass and records it into `graph`."""

    def __init__(self, graph: Any) -> None:
        super().__init__()
        self.graph = graph
        self._in_kernel = False
        self._held: dict[int, int] = {}  # storages the graph's outputs keep alive -> bytes

    @property
    def held_bytes(self) -> int:
        """Memory the recorded outputs keep for the graph's lifetime."""
        return sum(self._held.values())

    def _hold(self, outputs) -> None:
        for t in outputs:
            if isinstance(t, torch.Tensor):
                self._held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    def __enter__(self) -> "Recorder":
        global active
        if active is not None:
            raise RecordingError("a pass is already being recorded")
        active = self
        try:
            return super().__enter__()
        except BaseException:
            active = None
            raise

    def __exit__(self, *exc: Any) -> None:
        global active
        active = None
        super().__exit__(*exc)

    def check_implementation(self, op_name: str, impl: Any) -> None:
        if not impl.capturable:
            raise RecordingError(f"op {op_name}: implementation '{impl.name}' cannot be recorded")

    def kernel_call(self, name: str, kernel: Any, args: tuple) -> Any:
        """Run one of our kernels and record it with its outputs (what its replay writes into)."""
        self._in_kernel = True  # its own allocations are not nodes
        try:
            result = kernel(*args)
        finally:
            self._in_kernel = False
        outputs = () if result is None else result if isinstance(result, tuple) else (result,)
        try:
            self.graph.add_kernel(name, (*args, *outputs))
        except RuntimeError as exc:
            raise RecordingError(str(exc).splitlines()[0]) from exc
        self._hold(outputs)
        return result

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self._in_kernel or func in _ALLOCATIONS:
            return func(*args, **kwargs)
        refusal = _refusal(func, args)
        if refusal is not None:
            raise RecordingError(f"{func}: {refusal}")
        result = func(*args, **kwargs)
        schema = func._schema
        name, overload = schema.name, schema.overload_name
        if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            self._add_operator(func, name, overload, args, kwargs, [])  # in place: replayed where it writes
            return result
        outputs, _ = tree_flatten(result)
        if not outputs or not all(isinstance(t, torch.Tensor) for t in outputs):
            raise RecordingError(f"{func}: returns a Python value ({type(result).__name__})")
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        aliased = _storages(outputs) & _storages(inputs)
        if aliased and len(aliased) == len(_storages(outputs)):
            return result  # a view: it reads the recorded storage at every replay
        if aliased:
            raise RecordingError(f"{func}: some outputs are views and some are not")
        self._add_operator(func, name, overload, args, kwargs, outputs)
        return result

    def _add_operator(self, func: Any, name: str, overload: str, args: tuple, kwargs: dict,
                      outputs: list[torch.Tensor]) -> None:
        try:
            self.graph.add_operator(name, overload, list(args), dict(kwargs), outputs)
        except RuntimeError as exc:
            raise RecordingError(f"{func}: {str(exc).splitlines()[0]}") from exc
        self._hold(outputs)
