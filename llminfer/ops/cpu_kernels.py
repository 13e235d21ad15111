"""Our C++ CPU kernels (llminfer/ops/csrc): compiled with torch.utils.cpp_extension on first use, cached.

One build holds every instruction-set variant (each function compiled for its own target); the variant runs is
chosen at run time from what the CPU reports, or forced with LLMINFER_CPU_ISA=avx2 | avx_vnni | avx512_vnni
(tests use it to run the AVX2 path on an AVX-512 machine). Where no compiler exists or the build fails, the
implementations that use these kernels report themselves unavailable and the reference ops run (one log line).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from llminfer.ops import recording

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("quantized_linear.cpp", "quantized_gemm.cpp", "float_linear.cpp", "decode_ops.cpp",
                         "step_graph.cpp")]


def unavailable_reason() -> str | None:
    """Why the kernels cannot be built or run here, or None (no compile happens here)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU kernels are written for x86-64, not {platform.machine()}"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++ / $CXX) to build the CPU kernels"
    if "avx2" not in cpu_flags():
        return "the CPU has no AVX2"
    return _build_error


_build_error: str | None = None


def build_requirement() -> str | None:
    """The requirement of every implementation that calls these kernels: None once they are built (compiling them
    now if this is the first use on this machine), else why they cannot run. Choosing an implementation thus never
    picks one whose kernels then fail to load."""
    reason = unavailable_reason()
    if reason is None:
        kernels()
        reason = _build_error
    return reason


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def kernels() -> ModuleType | None:
    """The compiled extension (built on first call, then cached on disk), or None if the build failed. While a
    pass is recorded (ops/recording.py), its kernel calls are recorded too."""
    global _build_error
    if _build_error is not None:
        return None
    try:
        module = _load()
        return module if recording.active is None else _RecordedKernels(module, recording.active)
    except Exception as exc:  # noqa: BLE001 - a failed build means the reference ops run, said once
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        first_error = next((line for line in lines if "error:" in line), lines[-1])  # the compiler's, not ninja's
        _build_error = f"the CPU kernels failed to build: {first_error.strip()}"
        logger.error("%s; using the reference ops", _build_error)
        return None


@functools.cache
def _load() -> ModuleType:
    from torch.utils.cpp_extension import load

    start = time.perf_counter()
    remove_stale_lock(_build_directory())
    if not _built_before():
        print("llminfer: compiling the CPU kernels (first use on this machine, about a minute) ...",
              file=sys.stderr, flush=True)
    module = load(name=build_name(), sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS,
                  extra_ldflags=["-fopenmp"], verbose=False)
    logger.info("CPU kernels ready in %.1f s", time.perf_counter() - start)
    return module


CFLAGS = ["-O3", "-std=c++17", "-fopenmp"]  # OpenMP: at::parallel_for is serial without it


def build_name() -> str:
    """The extension's name, one per checkout and source version: ninja decides what to rebuild from the absolute
    source paths in its build file, so two checkouts (or two commits) sharing one build folder would rebuild each
    other's kernels on every start."""
    digest = hashlib.sha1(" ".join(CFLAGS).encode())
    for source in sorted(SOURCES[0].parent.iterdir()):  # the sources and the headers they include
        digest.update(str(source.resolve()).encode())
        digest.update(source.read_bytes())
    return f"llminfer_cpu_kernels_{digest.hexdigest()[:12]}"


STALE_LOCK_SECONDS = 600  # a build takes about a minute; a lock this old was left by a process that died


def remove_stale_lock(build_directory: Path | None) -> None:
    """torch.utils.cpp_extension waits, without limit, on a `lock` file in the build directory that the building
    process removes when done; a process killed mid-build leaves it behind and every later run would hang. One that
    old is removed (and said)."""
    lock = build_directory / "lock" if build_directory is not None else None
    try:
        age = time.time() - lock.stat().st_mtime if lock is not None else None
    except OSError:
        return  # no lock: nobody is building
    if age is not None and age > STALE_LOCK_SECONDS:
        logger.warning("removing %s, left %.0f s ago by a build that did not finish", lock, age)
        lock.unlink(missing_ok=True)


def _build_directory() -> Path | None:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(build_name(), False))
    except Exception:  # noqa: BLE001 - a private helper of torch; without it, nothing to clean
        return None


def _built_before() -> bool:
    directory = _build_directory()  # without it, say "compiling" every time
    return directory is not None and (directory / f"{build_name()}.so").is_file()


class _RecordedKernels:
    """The extension as a recorded pass sees it: each kernel call also becomes a node of the recorder's graph."""

    def __init__(self, module: ModuleType, recorder: "recording.Recorder") -> None:
        self._module, self._recorder = module, recorder

    def __getattr__(self, name: str):
        kernel = getattr(self._module, name)
        return lambda *args: self._recorder.kernel_call(name, kernel, args)


def has_bf16_dot_products() -> bool:
    """Whether the CPU multiplies bfloat16 natively (oneDNN's bfloat16 matmul is fast there, slow elsewhere)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def takes(*tensors: torch.Tensor) -> bool:
    """Whether the kernels compute on these tensors: float32 or bfloat16, all the same dtype (the reference runs
    the others, e.g. float16)."""
    dtype = tensors[0].dtype
    return dtype in (torch.float32, torch.bfloat16) and all(t.dtype == dtype for t in tensors)


@functools.cache
def isa() -> str:
    """The instruction set the kernels use: LLMINFER_CPU_ISA (read once), or 'auto' (the best this CPU has)."""
    return os.environ.get("LLMINFER_CPU_ISA", "auto")


@functools.cache
def integer_isa() -> str:
    """The instruction set the integer kernels run: LLMINFER_CPU_ISA's, else the best this CPU has (built)."""
    return kernels().supported_isas()[0] if isa() == "auto" else isa()


def float_isa() -> str:
    """The float kernels' path: AVX2 when LLMINFER_CPU_ISA asks for a 256-bit one, else the best this CPU has."""
    return "avx2" if isa() in ("avx2", "avx_vnni") else "auto"
