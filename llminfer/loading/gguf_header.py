"""A bounds check of a GGUF file's header, before the `gguf` library parses it.

The library trusts the counts it reads: a metadata array that declares 2**40 elements makes it allocate and loop
for minutes. Here every count, length and dimension is checked against the bytes that remain in the file, by
walking the header once without building anything (strings and arrays are skipped, not read).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from llminfer.errors import ModelFormatError

# GGUF value types: fixed sizes, and the two variable ones.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_ELEMENTS = 2**48  # far beyond any real tensor, small enough that sizes stay exact


class _Walker:
    def __init__(self, data: mmap.mmap, path: Path, endian: str) -> None:
        self.data, self.path, self.endian, self.at = data, path, endian, 0

    def fail(self, what: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: not a valid GGUF file ({what} at byte {self.at} of {len(self.data)})")

    def take(self, count: int, what: str) -> int:
        if count < 0 or count > len(self.data) - self.at:
            raise self.fail(f"{what} of {count} bytes runs past the end of the file")
        start, self.at = self.at, self.at + count
        return start

    def integer(self, code: str, what: str) -> int:
        size = struct.calcsize(code)
        return struct.unpack_from(self.endian + code, self.data, self.take(size, what))[0]

    def string(self, what: str) -> None:
        self.take(self.integer("Q", f"{what} length"), what)

    def value(self, kind: int, what: str, depth: int = 0) -> None:
        if kind in _SCALAR_SIZES:
            self.take(_SCALAR_SIZES[kind], what)
        elif kind == _STRING:
            self.string(what)
        elif kind == _ARRAY and depth < 2:
            element = self.integer("I", f"{what} element type")
            count = self.integer("Q", f"{what} length")
            smallest = _SCALAR_SIZES.get(element, 8)  # a string or an array takes at least its 8-byte length
            if count * smallest > len(self.data) - self.at:
                raise self.fail(f"{what} declares {count} elements, more than the file's remaining bytes can hold")
            if element in _SCALAR_SIZES:
                self.take(count * smallest, what)
            else:
                for _ in range(count):
                    self.value(element, what, depth + 1)
        else:
            raise self.fail(f"{what} has unknown value type {kind}")


def check_gguf_header(path: Path) -> None:
    """Raise ModelFormatError (one line, naming the field) if the header's counts do not fit the file."""
    with open(path, "rb") as file:
        try:
            data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise ModelFormatError(f"{path}: not a valid GGUF file (empty)") from None
    with data:
        if data[:4] != b"GGUF":
            raise ModelFormatError(f"{path}: not a GGUF file (magic {bytes(data[:4])!r}, expected b'GGUF')")
        little = struct.unpack_from("<I", data, 4)[0] if len(data) >= 8 else 0
        endian = "<" if little & 0xFFFF else ">"  # a big-endian file reads as a huge little-endian version
        walker = _Walker(data, path, endian)
        walker.take(4, "magic")
        version = walker.integer("I", "version")
        if version not in (2, 3):
            raise walker.fail(f"version {version} (supported: 2, 3)")
        tensors = walker.integer("Q", "tensor count")
        entries = walker.integer("Q", "metadata count")
        remaining = len(data) - walker.at
        if entries * 13 > remaining or tensors * 24 > remaining:  # the smallest entry / tensor record
            raise walker.fail(f"{entries} metadata entries and {tensors} tensors cannot fit in {remaining} bytes")
        for index in range(entries):
            walker.string(f"metadata key {index}")
            walker.value(walker.integer("I", f"metadata {index} type"), f"metadata {index} value")
        for index in range(tensors):
            walker.string(f"tensor {index} name")
            dims = walker.integer("I", f"tensor {index} dimension count")
            if not 1 <= dims <= MAX_DIMS:
                raise walker.fail(f"tensor {index} has {dims} dimensions (1 to {MAX_DIMS})")
            elements = 1
            for _ in range(dims):
                size = walker.integer("Q", f"tensor {index} dimension")
                elements *= size
                if size < 1 or elements > MAX_TENSOR_ELEMENTS:
                    raise walker.fail(f"tensor {index} has a dimension of {size} ({elements} elements so far)")
            walker.take(4 + 8, f"tensor {index} type and offset")
