"""Compile and launch the CUDA kernels of ``_kernels.cu``.

The kernels work from one int64 *table* per tree layout: each leaf's pointer,
size and dtype code, and a chunk -> leaf map (a block reduces or scales one
chunk of ``CHUNK`` elements of one leaf). The table is built with NumPy on the
host, uploaded once, and cached by the leaves' pointers, sizes and dtypes,
together with the norm kernel's workspace, per device and stream; a call on a
known layout uploads nothing. Nothing here waits for the device.

Where the kernels run is a :class:`Device`: :class:`CupyDevice` for CuPy
arrays on the current stream of their device. The tests provide a second
one that runs the same kernels on the CPU (``tests/cuda_emulator``), so the
host logic here is tested on machines with no GPU.
"""

from __future__ import annotations

import collections
import functools
import importlib
import importlib.resources
import operator
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .. import _compat
from .._numpy import spans_overlap

__all__ = [
    "CHUNK",
    "CODES",
    "MODES",
    "OPTIONS",
    "THREADS",
    "CupyDevice",
    "Device",
    "Layout",
    "Outputs",
    "source",
]

THREADS = 256  # threads per block (GC_THREADS in the source)
CHUNK = 1 << 15  # elements per block: 128 per thread
# Leaves of more chunks than this are merged by the whole last block, the
# others one thread each.
SMALLK = 32
OPTIONS = ("-std=c++17", f"-DGC_THREADS={THREADS}")

# dtype name -> GC_F16 ... GC_C128 in the source.
CODES = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3, "complex64": 4, "complex128": 5}
WIDE = (CODES["float64"], CODES["complex128"])  # their norms and stats are float64
# (kind, p) -> the norm kernel compiled for it; p None: any p.
_NORM_KERNELS = {
    ("p", 2.0): "gc_norm_p2",
    ("p", 1.0): "gc_norm_p1",
    ("p", None): "gc_norm_p",
    ("inf", None): "gc_norm_inf",
    ("-inf", None): "gc_norm_neginf",
    ("zero", None): "gc_norm_zero",
}
MODES = {"global": 0, "leaf": 1, "rms": 2}
_CACHE_SIZE = 16  # tree layouts kept per process

_size = operator.attrgetter("size")
_dtype = operator.attrgetter("dtype")


def source() -> str:
    """The CUDA source, as packaged with gradclip."""
    return importlib.resources.files(__package__).joinpath("_kernels.cu").read_text()


class Device(Protocol):
    """Where the kernels run and how its memory is handled."""

    threads: int
    chunk: int
    smallk: int

    def key(self) -> Any:
        """What a cached layout depends on besides the leaves (device, stream)."""

    def ptr(self, x: Any) -> int:
        """The address of ``x``'s first element."""

    def upload(self, host: np.ndarray) -> Any:
        """A device copy of a host array (asynchronous; ``host`` is not reused)."""

    def zeros(self, count: int, dtype: Any) -> Any:
        """A zeroed 1-d device array."""

    def empty(self, nbytes: int) -> Any:
        """An uninitialised 1-d uint8 device array."""

    def view(self, buf: Any, offset: int, shape: tuple[int, ...], dtype: Any) -> Any:
        """An array of ``shape`` and ``dtype`` at byte ``offset`` of ``buf``."""

    def launch(self, name: str, grid: int, args: tuple[Any, ...]) -> None:
        """Launch kernel ``name`` on ``grid`` blocks of ``threads`` threads."""


@dataclass
class Layout:
    """The table of one tree layout on one device, and the norm kernel's workspace."""

    table: Any  # int64, on the device
    n: int
    chunks: int
    nbig: int
    total: int  # elements in all leaves
    out_offsets: list[int]  # byte offsets of the leaves in a functional output buffer
    out_bytes: int
    work_f64: Any
    work_i32: Any  # its last entry is the last-block ticket, left at 0 by every launch
    overlap: bool  # two leaves share memory (one array given twice, overlapping views)
    res: Any  # the result dtype: float64 when a leaf is float64 or complex128, else float32
    key: Any = None  # its key in the cache

    def head(self) -> tuple[Any, ...]:
        """The kernels' first arguments: the table and its counts."""
        return (self.table, np.int32(self.n), np.int32(self.chunks), np.int32(self.nbig))

    def sizes(self) -> Any:
        """The per-leaf sizes inside the device table."""
        return self.table[self.n : 2 * self.n]


def build(dev: Device, ptrs: Sequence[int], sizes: Sequence[int], dtypes: Sequence[Any]) -> Layout:
    """Build and upload the table of a layout (vectorised: thousands of leaves are cheap)."""
    n = len(ptrs)
    size = np.fromiter(sizes, np.int64, n)
    code = np.array([CODES[d.name] for d in dtypes], np.int64)
    items = np.array([d.itemsize for d in dtypes], np.int64)
    per_leaf = -(-size // dev.chunk)
    first = np.zeros(n + 1, np.int64)
    np.cumsum(per_leaf, out=first[1:])
    chunks = int(first[-1])
    chunk_leaf = np.repeat(np.arange(n, dtype=np.int64), per_leaf)
    chunk_start = (np.arange(chunks, dtype=np.int64) - first[chunk_leaf]) * dev.chunk
    big = np.flatnonzero(per_leaf > dev.smallk).astype(np.int64)
    # Functional outputs: one buffer, each leaf at a 16-byte-aligned offset.
    nbytes = -(-(size * items) // 16) * 16
    out = np.zeros(n + 1, np.int64)
    np.cumsum(nbytes, out=out[1:])
    start = np.fromiter(ptrs, np.int64, n)
    table = np.concatenate([start, size, code, first, chunk_leaf, chunk_start, big, out[:n]])
    return Layout(
        table=dev.upload(table),
        n=n,
        chunks=chunks,
        nbig=int(big.size),
        total=int(size.sum()),
        out_offsets=out[:n].tolist(),
        out_bytes=max(int(out[-1]), 16),
        work_f64=dev.zeros(chunks + 1 + n, np.float64),
        work_i32=dev.zeros(2 * (chunks + 1) + 2 * n + 1, np.int32),
        overlap=spans_overlap(start[size > 0], (start + size * items)[size > 0]),
        res=np.dtype(np.float64 if np.isin(code, WIDE).any() else np.float32),
    )


_layouts: collections.OrderedDict[Any, Layout] = collections.OrderedDict()
# Held around every use of ``_layouts`` and ``_uploads``: clips may run in
# several threads, and an OrderedDict's get + move_to_end is not atomic.
_lock = threading.Lock()


class _Key:
    """A layout's cache key, which hashes its thousands of entries once, not per lookup."""

    __slots__ = ("_hash", "parts")

    def __init__(self, parts: tuple[Any, ...]) -> None:
        self.parts = parts
        self._hash = hash(parts)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and self.parts == other.parts


def layout(dev: Device, leaves: Sequence[Any]) -> Layout:
    """The cached layout of ``leaves`` (built on first sight)."""
    return layout_of(
        dev, tuple(map(dev.ptr, leaves)), tuple(map(_size, leaves)), tuple(map(_dtype, leaves))
    )


def layout_of(
    dev: Device, ptrs: tuple[int, ...], sizes: tuple[int, ...], dtypes: tuple[Any, ...]
) -> Layout:
    """The cached layout of leaves at addresses ``ptrs`` of ``sizes`` and NumPy ``dtypes``."""
    key = _Key((dev.key(), ptrs, sizes, dtypes))
    with _lock:
        found = _layouts.get(key)
        if found is not None:
            _layouts.move_to_end(found.key)  # the stored key: found by identity
            return found
    made = build(dev, ptrs, sizes, dtypes)
    made.key = key
    with _lock:
        made = _layouts.setdefault(key, made)
        while len(_layouts) > _CACHE_SIZE:
            _layouts.popitem(last=False)
    return made


def supported(leaves: Sequence[Any]) -> bool:
    """Whether the kernels take these leaves: C-contiguous, of a dtype they know."""
    names = {d.name for d in set(map(_dtype, leaves))}
    return names <= CODES.keys() and _compat.cupy_c_contiguous(leaves)


# ------------------------------------------------------------------ the outputs


@dataclass
class Outputs:
    """Views of one call's output buffer (layout: ``struct Out`` in the source)."""

    buf: Any
    res: Any  # float32 or float64
    n: int

    def norm(self, dev: Device) -> Any:
        """The global norm, 0-d."""
        return dev.view(self.buf, 0, (), self.res)

    def scale(self, dev: Device) -> Any:
        """The global scale, 0-d."""
        return dev.view(self.buf, 8, (), self.res)

    def clipped(self, dev: Device) -> Any:
        """Whether the global scale is below 1, 0-d bool."""
        return dev.view(self.buf, 16, (), np.bool_)

    def finite(self, dev: Device) -> Any:
        """Whether every entry was finite, 0-d bool."""
        return dev.view(self.buf, 17, (), np.bool_)

    def leaf(self, dev: Device, field: int, dtype: Any = None) -> Any:
        """Per-leaf field 0 (norms), 1 (scales), 2 (clipped) or 3 (finite), 1-d."""
        n8 = 8 * self.n
        offset = (32, 32 + n8, 32 + 2 * n8, 32 + 2 * n8 + self.n)[field]
        return dev.view(self.buf, offset, (self.n,), self.res if field < 2 else np.bool_)

    def split(self, dev: Device) -> Any:
        """The norm kernels' per-leaf norms as ``m * 2**e``: ``(m, e)`` as float64 rows.

        Finite where a float64 leaf's norm is past double (for an rms that is not).
        """
        return dev.view(self.buf, _split_at(self.n), (2, self.n), np.float64)


def _split_at(n: int) -> int:
    return (32 + 18 * n + 7) // 8 * 8


def outputs(dev: Device, n: int, res: Any) -> Outputs:
    """A fresh output buffer for ``n`` leaves."""
    return Outputs(dev.empty(_split_at(n) + 16 * n + 8), np.dtype(res), n)


def _bound_args(out: Outputs, mode: str, skip: bool, max_norm: Any, eps: float) -> tuple[Any, ...]:
    """Result dtype, mode, policy and bound: the arguments the norm kernels end with."""
    res64 = np.int32(out.res == np.float64)
    if isinstance(max_norm, int | float):
        bound, at = np.float64(max_norm), np.uint64(0)
    else:  # a device array: read by the kernel, never by the host
        bound, at = np.float64(0.0), max_norm
    return (res64, np.int32(MODES[mode]), np.int32(skip), bound, np.float64(eps), at)


def norm(
    dev: Device,
    lay: Layout,
    out: Outputs,
    *,
    kind: str,
    p: float,
    zero: bool,
    mode: str = "global",
    skip: bool = False,
    max_norm: Any = 0.0,
    eps: float = 0.0,
) -> None:
    """Per-leaf and global norms into ``out`` and, per ``mode``, the scales."""
    dev.launch(
        _NORM_KERNELS.get((kind, p), _NORM_KERNELS[kind, None]),
        max(lay.chunks, 1),
        (
            *lay.head(),
            np.int64(dev.chunk),
            np.float64(p),
            np.int32(zero),
            np.int32(dev.smallk),
            np.int64(lay.total),
            lay.work_f64,
            lay.work_i32,
            out.buf,
            *_bound_args(out, mode, skip, max_norm, eps),
        ),
    )


def given(
    dev: Device,
    lay: Layout,
    out: Outputs,
    norms: Any,
    *,
    mode: str,
    skip: bool,
    max_norm: Any,
    eps: float,
) -> None:
    """Scales into ``out`` from norms the caller computed (result dtype, on the device)."""
    count = 1 if mode == "global" else lay.n
    dev.launch(
        "gc_given",
        -(-count // dev.threads),
        (
            norms,
            np.int32(count),
            lay.sizes(),
            out.buf,
            *_bound_args(out, mode, skip, max_norm, eps),
        ),
    )


def scale(
    dev: Device, lay: Layout, scales: Any, *, per_leaf: bool, res: Any, zero: bool, dst: Any
) -> None:
    """Multiply every leaf by its scale; ``dst``: an output buffer, or None for in place."""
    if lay.chunks == 0:
        return
    dev.launch(
        "gc_scale",
        lay.chunks,
        (
            *lay.head(),
            np.int64(dev.chunk),
            scales,
            np.int32(per_leaf),
            np.int32(np.dtype(res) == np.float64),
            np.int32(zero),
            np.uint64(0 if dst is None else dev.ptr(dst)),
        ),
    )


def _bits(value: float | None, dtype: Any) -> tuple[Any, ...]:
    """``value`` in every real dtype, rounded as ``asarray(value, dtype=...)`` rounds it."""
    if value is None:
        return np.uint32(0), np.uint32(0), np.float32(0), np.float64(0)
    # A bound past a dtype's range rounds to inf there, as intended; NumPy's
    # overflow warning would reach the caller (an error under -W error).
    with np.errstate(over="ignore"):
        half = np.uint32(np.asarray(value, np.float16).view(np.uint16))
        bf16 = np.uint32(0)
        if dtype is not None:  # ml_dtypes' bfloat16, present only when a leaf uses it
            bf16 = np.uint32(np.asarray(value, dtype).view(np.uint16))
        return half, bf16, np.float32(value), np.float64(value)


def clamp(
    dev: Device,
    lay: Layout,
    *,
    lo: float | None,
    hi: float | None,
    zero: bool,
    finite: Any,
    dst: Any,
    bf16: Any,
) -> None:
    """Clamp every entry into ``[lo, hi]``; ``finite``: a 0-d flag for ``"skip"``, or None."""
    if lay.chunks == 0:
        return
    lo16, lob, lof, lod = _bits(lo, bf16)
    hi16, hib, hif, hid = _bits(hi, bf16)
    dev.launch(
        "gc_clamp_kernel",
        lay.chunks,
        (
            *lay.head(),
            np.int64(dev.chunk),
            lo16,
            hi16,
            lob,
            hib,
            lof,
            hif,
            lod,
            hid,
            np.int32(lo is not None),
            np.int32(hi is not None),
            np.int32(zero),
            np.uint64(0) if finite is None else finite,
            np.uint64(0 if dst is None else dev.ptr(dst)),
        ),
    )


# ------------------------------------------------------------------------ CuPy


# ``cudaStreamPerThread``: one handle for a different stream in every thread
# (CuPy's ``Stream.ptds``, and its default stream under
# CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1).
PER_THREAD_STREAM = 2


def stream_key(device_id: int, stream: int) -> tuple[int, int, int | None]:
    """What tells the streams apart that may run a layout's workspace at once.

    Kernels on one stream run one after another, so they may share a
    workspace (and its last-block ticket); kernels on two streams may not.
    The per-thread default stream has one handle in every thread, so there
    the thread tells them apart.
    """
    thread = threading.get_ident() if stream == PER_THREAD_STREAM else None
    return (device_id, stream, thread)


@functools.cache
def _module(device_id: int) -> Any:
    """The compiled kernels on one device (NVRTC; CuPy also caches the binary on disk)."""
    cp = importlib.import_module("cupy")
    with cp.cuda.Device(device_id):
        return cp.RawModule(code=source(), options=OPTIONS)


@functools.cache
def _kernel(device_id: int, name: str) -> Any:
    return _module(device_id).get_function(name)


class CupyDevice:
    """CuPy arrays on one device; kernels on its current stream."""

    threads = THREADS
    chunk = CHUNK
    smallk = SMALLK

    def __init__(self, device_id: int) -> None:
        self.cp = importlib.import_module("cupy")
        self.id = device_id
        # Entered around every allocation and launch: the leaves' device need
        # not be the current one (entering the current device costs no switch).
        self.on = self.cp.cuda.Device(device_id)

    def key(self) -> Any:
        """The device and its current stream: a workspace is used by one stream at a time."""
        return stream_key(self.id, self.cp.cuda.get_current_stream(self.id).ptr)

    # ``x.data.ptr``, read for every leaf of every call: an attrgetter costs
    # 0.05 us a leaf, a method 0.13 (2000 leaves: 0.1 ms, not 0.26).
    ptr = staticmethod(operator.attrgetter("data.ptr"))

    def upload(self, host: np.ndarray) -> Any:
        """Copy through pinned memory, so that the copy is asynchronous."""
        cp = self.cp
        pinned = importlib.import_module("cupyx").empty_pinned(host.shape, host.dtype)
        pinned[...] = host
        with self.on:
            out = cp.empty(host.shape, host.dtype)
            stream = cp.cuda.get_current_stream()
            out.set(pinned, stream=stream)
            # The copy may still be reading ``pinned``: keep it until the stream passes here.
            done = stream.record()
        with _lock:
            _uploads.append((done, pinned))
            while _uploads and _uploads[0][0].done:
                _uploads.popleft()
        return out

    def zeros(self, count: int, dtype: Any) -> Any:
        """``cupy.zeros``."""
        with self.on:
            return self.cp.zeros(count, dtype)

    def empty(self, nbytes: int) -> Any:
        """``cupy.empty``, uint8."""
        with self.on:
            return self.cp.empty(nbytes, self.cp.uint8)

    def view(self, buf: Any, offset: int, shape: tuple[int, ...], dtype: Any) -> Any:
        """An ndarray over ``buf``'s memory, from ``offset``."""
        return self.cp.ndarray(shape, dtype, memptr=buf.data + offset)

    def launch(self, name: str, grid: int, args: tuple[Any, ...]) -> None:
        """Launch on the current stream."""
        with self.on:
            _kernel(self.id, name)((grid,), (self.threads,), args)


# Pinned staging buffers of uploads that may still be in flight.
_uploads: collections.deque[tuple[Any, np.ndarray]] = collections.deque()
