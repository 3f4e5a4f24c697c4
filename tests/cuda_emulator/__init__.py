"""Run gradclip's CUDA kernels on the CPU, so their logic is tested without a GPU.

``harness.cpp`` compiles ``src/gradclip/cupy/_kernels.cu`` with g++ against
``emulator.h`` (blocks in turn, each block's threads as real threads meeting
at ``__syncthreads()``). :class:`EmuDevice` is a ``gradclip.cupy._launch.Device``
whose memory is NumPy arrays, so the real launcher and fast path run over it.
"""

from __future__ import annotations

import ctypes
import pathlib
import shutil
import subprocess
from typing import Any

import numpy as np

HERE = pathlib.Path(__file__).parent
KERNELS = HERE.parent.parent / "src" / "gradclip" / "cupy"

_CTYPES = {
    np.int32: ctypes.c_int,
    np.int64: ctypes.c_longlong,
    np.uint32: ctypes.c_uint,
    np.uint64: ctypes.c_ulonglong,
    np.float32: ctypes.c_float,
    np.float64: ctypes.c_double,
}


def compiler_problem() -> str | None:
    """Why the harness cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "no g++ to build the CPU emulation of the CUDA kernels"
    return None


def build(directory: pathlib.Path, threads: int) -> pathlib.Path:
    """Compile the harness into ``directory``; compiler errors and warnings fail."""
    target = directory / f"gc_emulator_{threads}.so"
    cmd = [
        "g++", "-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
        "-pthread", "-shared", "-fPIC", f"-DGC_THREADS={threads}", f"-I{KERNELS}",
        str(HERE / "harness.cpp"), "-o", str(target),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return target


class EmuDevice:
    """A ``_launch.Device`` over host memory; small chunks exercise the multi-chunk paths."""

    def __init__(self, library: pathlib.Path, threads: int, chunk: int, smallk: int) -> None:
        self.lib = ctypes.CDLL(str(library))
        self.threads = threads
        self.chunk = chunk
        self.smallk = smallk
        self.launches: list[str] = []

    def key(self) -> Any:
        return ("emulator", self.chunk, self.smallk)

    def ptr(self, x: Any) -> int:
        return int(x.__array_interface__["data"][0])

    def upload(self, host: np.ndarray) -> np.ndarray:
        return host.copy()

    def zeros(self, count: int, dtype: Any) -> np.ndarray:
        return np.zeros(count, dtype)

    def empty(self, nbytes: int) -> np.ndarray:
        # Garbage, as cupy.empty may hold: every output must be written.
        return np.full(nbytes, 0xA5, np.uint8)

    def view(self, buf: Any, offset: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.ndarray(shape, dtype, buffer=buf, offset=offset)

    def launch(self, name: str, grid: int, args: tuple[Any, ...]) -> None:
        self.launches.append(name)
        getattr(self.lib, "emu_" + name)(ctypes.c_uint(grid), *map(_arg, args))


def _arg(value: Any) -> Any:
    if isinstance(value, np.ndarray):  # device memory: a pointer
        return ctypes.c_void_p(value.__array_interface__["data"][0])
    return _CTYPES[type(value)](value.item())
