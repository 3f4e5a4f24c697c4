"""The torch fast path: gradclip's functions on torch tensors, grouped per dtype.

Registered in ``gradclip._api._FAST_PATHS`` for torch leaves, and used by the
drop-ins of :mod:`gradclip.torch`. Results are the generic path's (the same
:class:`~gradclip._norms.Plan` arithmetic and ``ClipStats``); what changes is
how the passes over memory are made:

- **CPU tensors**: the NumPy fast path's arithmetic
  (:class:`gradclip._numpy.NumpyPlan`), BLAS dots summed in float64, so the
  norm is overflow-safe and one read of memory. Small tensors are gathered
  into one buffer per group by torch's nested-tensor constructor and dotted
  in NumPy's groups;
  large float32 ones by torch's row norms; the rest through zero-copy NumPy
  views (bfloat16 ones through ``ml_dtypes`` when it is installed). torch's
  own float32 CPU norm overflows at 1e19 and costs a dispatch per tensor.
- **CUDA tensors, with CuPy installed**: gradclip's own kernels
  (:mod:`gradclip.cupy`), on the tensors' memory (their addresses, no
  DLPack per tensor) and on torch's current stream: one launch for every
  norm and flag, one to scale (which leaves the memory untouched when the
  scale is 1).
- **Other devices** (and CUDA without CuPy): ``torch._foreach_norm`` per dtype
  group for ``ord=inf``, a max, exact in any dtype. torch's foreach p-norms
  add in float32, which overflows for float32 and bfloat16 squares and is
  not accurate to 1e-6 for float16 ones, so p-norms take the generic
  blockwise path, which adds in float64; no host sync either way.
- **Scaling** is one ``torch._foreach_mul_`` per dtype group with the scale
  as a 0-d tensor (about 0.5 us a tensor on this machine's CPU, where the
  Python-scalar overload costs four times that). On the CPU, where reading a
  value costs no device sync, nothing is written when the scale is 1.

``USE_NUMPY_VIEWS`` turns the CPU route off, so the tests run the foreach
route on the CPU too (torch runs the same foreach ops there, one tensor at a
time). ``kernel_route`` finds the kernels' device for the leaves; the tests
give it the CPU emulation of the kernels, so this route's glue runs on the
CPU as well.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import operator
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .. import _blas, _compat, _core
from .._norms import Partial, Plan
from .._numpy import _SMALL, NumpyPlan, _fsum, _sumsq, _trusted, _work_dtype, gather_groups

__all__ = [
    "USE_NUMPY_VIEWS",
    "TorchPlan",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "global_norm",
    "leaf_norms",
    "per_example_clip",
]

USE_NUMPY_VIEWS = True
# Larger float32 leaves are reduced by torch in rows of _ROW elements (see
# _rows_accurate).
_ROW = 128
# Smaller ones, from _numpy._SMALL up, by one dsdot each on their memory
# (see _dsdots). Rows cost 8 us a tensor in calls, a dot 2; but on the llm
# tree's 786K-element leaves the dots (OpenBLAS's threads beside torch's
# spinning workers) were 1-2% slower than rows.
_DIRECT = 1 << 18
_KERNEL_DTYPES = ("float16", "bfloat16", "float32", "float64", "complex64", "complex128")


def _torch() -> Any:
    return sys.modules["torch"]


_requires_grad = operator.attrgetter("requires_grad")


def _tensors(scales: Any) -> list[Any]:
    """The scale tensors: one, or a list of per-leaf 0-d tensors."""
    return scales if isinstance(scales, list) else [scales]


@functools.cache
def _viewers() -> dict[Any, Callable[[Any], Any]]:
    """Map a torch dtype to a function giving a zero-copy NumPy view of a CPU tensor."""
    torch = _torch()
    viewers: dict[Any, Callable[[Any], Any]] = {
        d: torch.Tensor.numpy
        for d in (torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128)
    }
    if importlib.util.find_spec("ml_dtypes") is not None:
        import ml_dtypes

        bf16 = np.dtype(ml_dtypes.bfloat16)

        def view_bf16(x: Any) -> Any:
            return x.view(torch.int16).numpy().view(bf16)

        viewers[torch.bfloat16] = view_bf16
    return viewers


def _numpy_views(leaves: list[Any], dtypes: set[Any]) -> list[Any] | None:
    """NumPy arrays sharing the leaves' memory, or ``None`` where torch has none to give."""
    viewers = _viewers()
    if not all(d in viewers for d in dtypes):
        return None
    try:
        if len(dtypes) == 1:
            return list(map(viewers[next(iter(dtypes))], leaves))
        return [viewers[x.dtype](x) for x in leaves]
    except (RuntimeError, TypeError):
        # Tensors that require grad, or carry a conjugate or negative bit
        # (``x.conj()``), have no plain view; the foreach route takes them.
        return None


def _written(leaves: list[Any]) -> None:
    """Tell autograd that ``leaves`` were written in place behind torch's back.

    Writes through NumPy views or CuPy kernels do not bump a tensor's version
    counter, as torch's own in-place ops do; a gradient saved for a double
    backward (``create_graph=True``, a gradient penalty) would then be used
    modified without autograd's "modified by an inplace operation" error.
    """
    _torch().autograd.graph.increment_version(leaves)


def _as_torch(part: Partial, device: Any) -> Partial:
    torch = _torch()

    def conv(v: Any) -> Any:
        return None if v is None else torch.as_tensor(np.asarray(v), device=device)

    return Partial(conv(part.value), conv(part.exp), conv(part.finite))


@dataclass(frozen=True)
class Kernels:
    """gradclip's CUDA kernels over the leaves' memory (see :mod:`gradclip.cupy._launch`)."""

    dev: Any  # a gradclip.cupy._launch.Device
    leaves: Leaves  # the leaves as the launcher reads them
    stream: Callable[[], contextlib.AbstractContextManager[Any]]  # where launches go
    to_torch: Callable[[Any], Any]  # a device array as a tensor (same memory)
    from_torch: Callable[[Any], Any]  # a tensor as a device array (same memory)


class _StreamHandle:
    """A raw CUDA stream under the CUDA stream protocol, which CuPy 14 takes."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


def _cupy_stream(cupy: Any, handle: int, index: int) -> Any:
    """The stream ``handle`` of torch as a CuPy stream (CuPy 14 deprecates ``ExternalStream``)."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is None:  # CuPy 13
        return cupy.cuda.ExternalStream(handle, index)
    return from_external(_StreamHandle(handle))


def _cuda_kernels(leaves: list[Any]) -> Kernels | None:
    """The kernels for CUDA tensors when CuPy is installed and takes them, else ``None``."""
    torch = _torch()
    device = leaves[0].device
    if device.type != "cuda" or importlib.util.find_spec("cupy") is None:
        return None
    dtypes = {x.dtype for x in leaves}
    if not all(str(d).removeprefix("torch.") in _KERNEL_DTYPES for d in dtypes):
        return None
    if not all(map(torch.Tensor.is_contiguous, leaves)):
        return None
    if torch.bfloat16 in dtypes and importlib.util.find_spec("ml_dtypes") is None:
        return None  # CuPy has no bfloat16: the launcher types its bits with ml_dtypes'
    import cupy

    from ..cupy import _launch

    index = device.index if device.index is not None else torch.cuda.current_device()
    # Launches go on torch's current stream, so they are ordered with the
    # backward pass that wrote the gradients and the step that reads them.
    stream = _cupy_stream(cupy, torch.cuda.current_stream(device).cuda_stream, index)

    @contextlib.contextmanager
    def on() -> Any:
        with cupy.cuda.Device(index), stream:
            yield

    def from_torch(t: Any) -> Any:
        if t.dtype == torch.bfloat16:  # CuPy has no bfloat16: the raw bits, typed by ml_dtypes
            return cupy.from_dlpack(t.detach().view(torch.int16)).view(_np_dtype(t.dtype))
        return cupy.from_dlpack(t.detach())

    # The launcher reads only each leaf's address, size and dtype: no DLPack
    # round trip per leaf (126 ms a call on 2000 leaves, by cProfile on an H100),
    # and one pass per field (a tuple per leaf cost 0.66 us a leaf here, these 0.19).
    np_dtype = {d: _np_dtype(d) for d in dtypes}
    tensor = torch.Tensor
    read = Leaves(
        tuple(map(tensor.data_ptr, leaves)),
        tuple(map(tensor.numel, leaves)),
        tuple(map(np_dtype.__getitem__, map(_dtype, leaves))),
    )
    return Kernels(_launch.CupyDevice(index), read, on, torch.from_dlpack, from_torch)


_dtype = operator.attrgetter("dtype")


class Leaves(NamedTuple):
    """What the kernels' launcher reads of CUDA tensors, as of CuPy arrays."""

    ptrs: tuple[int, ...]
    sizes: tuple[int, ...]
    dtypes: tuple[Any, ...]  # NumPy dtypes


def _np_dtype(dtype: Any) -> Any:
    """The NumPy (or ml_dtypes) dtype of a torch dtype the kernels take."""
    name = str(dtype).removeprefix("torch.")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


kernel_route: Callable[[list[Any]], Kernels | None] = _cuda_kernels


@functools.cache
def _rows_accurate() -> bool:
    """Whether :func:`_rows_sumsqs` passes :func:`gradclip._blas.accurate` here.

    torch adds a row's squares in float32, in 8 lanes here (AVX2): one large
    square then 255 ones loses 31 of them (2e-6), a 16K-entry row 6e-5.
    Rows of 128 put at most 16 squares in a lane: about 20 roundings in
    all, 6e-7 on the norm. Where this fails, the leaves take NumPy's
    ``dsdot`` instead.
    """
    torch = _torch()

    def sumsq(v: np.ndarray) -> float:
        (total,) = _rows_sumsqs([torch.nn.functional.pad(torch.from_numpy(v), (0, -v.size % _ROW))])
        return math.nan if total is None else total

    return _blas.accurate(sumsq, _ROW)


def _dsdots(xs: list[Any]) -> list[float | None]:
    """Sums of squares of contiguous float32 CPU tensors below ``_DIRECT`` elements.

    One ``dsdot`` a tensor, on its memory: the call :class:`NumpyPlan`
    makes for a leaf shorter than its pieces (``_blas.PIECE``), so the same
    sum, bit for bit, kept or redone as NumPy's is (``None``: redone). 2 us
    a tensor in calls, where torch's row norms cost about 8, and NumPy views
    with NumPy's plan around them more: a 20-tensor MLP of 128x128 layers
    took 280 us a clip with rows, 200 with these.
    """
    dsdot = _blas.dsdot()
    assert dsdot is not None  # (the caller's check)
    work = np.dtype(np.float32)
    out: list[float | None] = []
    for x in xs:
        at, n = x.data_ptr(), x.numel()
        total = dsdot(n, at, 1, at, 1)
        out.append(total if _trusted(work, total, [x]) else None)
    return out


def _rows_sumsqs(xs: list[Any]) -> list[float | None]:
    """Sums of squares of contiguous float32 CPU tensors from their rows' norms, if exact enough.

    torch writes every leaf's row norms into one buffer, and NumPy's
    :func:`gradclip._numpy._sumsq` squares and adds each leaf's part of it
    in float64 (``dsdot``, or widened where BLAS has none), one BLAS call a
    leaf: the squares and sums as torch ops cost three dispatches a leaf,
    0.5 ms of 7.5 on the llm tree's 49 large leaves. ``None`` where that
    overflowed (inf), or where the sum may have lost too much to underflow:
    a square, of an entry or of a row's norm, below float32's subnormal
    spacing may vanish, ``numel * 2**-149`` at most, which is 2**-21 of a
    sum above ``numel * 2**-128``. Embedding rows no token touched are all
    zeros and cost nothing; a leaf of zeros, or of values near 1e-20, takes
    the caller's overflow-safe path. NaN is kept; it propagates either way.
    """
    torch = _torch()
    sizes = list(map(torch.Tensor.numel, xs))
    rows = [size // _ROW for size in sizes]
    norms = torch.empty(sum(rows), dtype=torch.float32)
    host, work = norms.numpy(), _work_dtype(np.dtype(np.float32))
    out: list[float | None] = []
    at = 0
    for x, size, n in zip(xs, sizes, rows, strict=True):
        main = x.view(n, _ROW) if n * _ROW == size else x.view(-1)[: n * _ROW].view(n, _ROW)
        torch.linalg.vector_norm(main, dim=1, out=norms[at : at + n])
        part = host[at : at + n]
        total = _sumsq(part if part.dtype == work else part.astype(work))
        at += n
        if n * _ROW < size:
            total += float(torch.linalg.vector_norm(x.view(-1)[n * _ROW :])) ** 2
        exact = not math.isinf(total) and total >= size * 2.0**-128
        out.append(total if exact else None)
    return out


def _cpu_work(dtype: Any) -> np.dtype | None:
    """The dtype small CPU leaves of a torch dtype are gathered and dotted in, or ``None``.

    :func:`gradclip._numpy._work_dtype`'s: float32 itself where BLAS has
    ``dsdot``, float64 for the rest of the real dtypes. Complex leaves are
    reduced through their NumPy views.
    """
    torch = _torch()
    if dtype == torch.float32:
        return _work_dtype(np.dtype(np.float32))
    if dtype in (torch.float64, torch.float16, torch.bfloat16):
        return np.dtype(np.float64)
    return None


# torch's GRAIN_SIZE: a CPU op on fewer elements runs on the calling thread.
_SERIAL = 1 << 15

_Copies = list[tuple[int, int, int, int]]  # (first leaf, end, buffer start, buffer end)


@functools.lru_cache(maxsize=8)  # layouts, as gather_groups keeps them
def _gathers(sizes: tuple[int, ...]) -> list[tuple[tuple[int, int], int, _Copies]]:
    """Each :func:`gather_groups` group ``[a, b)``, its size and its ``torch.cat`` calls.

    A call copies a run of leaves of fewer than ``_SERIAL`` elements in all
    (or one leaf) to its place in the group's buffer.
    """
    out = []
    for a, b in gather_groups(list(sizes)):
        copies: _Copies = []
        start, at, held = a, 0, 0
        for i in range(a, b):
            if i > start and held + sizes[i] >= _SERIAL:
                copies.append((start, i, at, at + held))
                start, at, held = i, at + held, 0
            held += sizes[i]
        copies.append((start, b, at, at + held))
        out.append(((a, b), at + held, copies))
    return out


def _gathered(
    work: np.dtype, tensors: list[Any], sizes: list[int]
) -> list[tuple[tuple[int, int], float | None]]:
    """Sums of squares of small CPU tensors of one dtype, per :func:`gather_groups` group.

    Each group is copied into a new buffer by ``torch.cat`` (then cast to
    ``work``) and dotted by NumPy (:func:`_sumsq`), as :class:`NumpyPlan`
    gathers and dots it: the same sum, bit for bit. ``None`` where the sum
    may have overflowed or lost entries to underflow.

    ``cat`` copies a run of fewer than ``_SERIAL`` elements with its serial
    kernel, on the calling thread: 0.2 to 0.5 us a tensor here; a larger cat
    copies tensor by tensor, at twice that. torch's nested-tensor
    constructor copied as fast on an idle machine, but on every thread of
    torch's pool (a parallel loop over the tensors): where the other cores
    were busy (data loader workers, say), each call waited for a thread to
    be scheduled, and a 2000-tensor clip took 68 ms against torch's 7 to 17.
    """
    torch = _torch()
    wide = torch.float32 if work == np.float32 else torch.float64
    dsdot = _blas.dsdot()  # found, where work is float32 (see _cpu_work)
    ndims = list(map(torch.Tensor.dim, tensors))
    if ndims.count(1) != len(ndims):  # cat takes 1-d tensors
        tensors = [t if n == 1 else t.reshape(-1) for t, n in zip(tensors, ndims, strict=True)]
    out: list[tuple[tuple[int, int], float | None]] = []
    for group, size, copies in _gathers(tuple(sizes)):
        buf = torch.empty(size, dtype=tensors[0].dtype)
        for a, b, start, stop in copies:
            torch.cat(tensors[a:b], out=buf[start:stop])
        if dsdot is not None and work == np.float32:
            # _sumsq's dsdot, at the tensor's address (an array's costs 2 us)
            at = buf.data_ptr()
            value = dsdot(size, at, 1, at, 1)
        else:
            with np.errstate(all="ignore"):  # np.dot warns of an overflow, seen and redone
                value = _sumsq(buf.to(wide).numpy())
        out.append((group, value if _trusted(work, value, [buf]) else None))
    return out


class TorchPlan(Plan):
    """:class:`Plan` whose passes over memory are NumPy views (CPU), the kernels or foreach ops."""

    _kernels: Kernels | None
    _reduced: tuple[Any, Any] | None  # the kernels' layout and outputs, once launched

    def __post_init__(self) -> None:
        super().__post_init__()
        self._kernels = None
        self._reduced = None
        if self.leaves and not self._on_host and not self.by_max:
            # the kernels scale by powers of two only (see _norms)
            self._kernels = kernel_route(self.leaves)

    @property
    def _on_host(self) -> bool:
        return USE_NUMPY_VIEWS and bool(self.leaves) and self.device.type == "cpu"

    @functools.cached_property
    def _host(self) -> NumpyPlan | None:
        """NumPy's plan over zero-copy views of the CPU leaves, or ``None`` where there are none.

        Made on first use: scaling by one foreach multiply needs no views,
        which cost 2.5 us a tensor (0.4 ms of the llm tree's 145).
        """
        if not self._on_host:
            return None
        views = _numpy_views(self.leaves, set(self._dtype_infos))
        if views is None:
            return None
        return NumpyPlan(np, self.p, views, zero_nonfinite=self.zero_nonfinite)

    # -- the kernels ---------------------------------------------------------------
    def _res_np(self) -> Any:
        return np.float64 if self.res == _torch().float64 else np.float32

    def _launch(self) -> tuple[Any, Any]:
        """One launch of the norm kernel: every leaf's norm and finite flag, and the totals."""
        from ..cupy import _launch

        if self._reduced is None:
            k = self._kernels
            assert k is not None
            with k.stream():
                lay = _launch.layout_of(k.dev, *k.leaves)
                # float64 norms: the generic code takes them on from here in
                # float64, and a float32 leaf's norm (1e39 for 1e4 entries of
                # 1e37, whose rms is 1e37) must not overflow on the way.
                out = _launch.outputs(k.dev, len(k.leaves.ptrs), np.float64)
                _launch.norm(k.dev, lay, out, kind=self.kind, p=self.p, zero=self.zero_nonfinite)
            self._reduced = (lay, out)
        return self._reduced

    def _kernel_parts(self, per_leaf: bool) -> list[Partial]:
        """Partials standing for the kernels' norms: one per leaf, or one for them all.

        A p-norm ``v`` becomes ``(v / 2**e)**p`` with exponent ``e``, so that
        no power overflows. Per leaf, the kernels give it as ``m * 2**e``,
        finite where a float64 leaf's norm is past double (its rms may not
        be). torch's ``ord=0`` counts leaves, so ``Plan.total`` needs each
        leaf's count.
        """
        k = self._kernels
        assert k is not None
        _, out = self._launch()
        per_leaf = per_leaf or self.kind == "zero"
        xp = self.xp
        exp = None
        with k.stream():
            if per_leaf:
                finite = out.leaf(k.dev, 3)
                if self.kind == "p":
                    v, exp = xp.astype(k.to_torch(out.split(k.dev)), self.acc)
                else:
                    v = xp.astype(k.to_torch(out.leaf(k.dev, 0)), self.acc)
            else:
                finite = out.finite(k.dev)
                v = xp.astype(k.to_torch(out.norm(k.dev)), self.acc)
            flags = k.to_torch(finite)
        if self.kind == "p":
            # The norm v * 2**e as (v * 2**(e - exp))**p, exp in the accumulator's range.
            e = self.const(0.0) if exp is None else exp
            ok = xp.isfinite(v) & (v > 0)
            exp = self.exponent(v, e)
            v = xp.pow(xp.where(ok, self.scale_down(v, exp - e), v), self.p)
        if not per_leaf:
            return [Partial(v, exp, flags)]
        parts = [
            Partial(v[i], None if exp is None else exp[i], flags[i])
            for i in range(len(self.leaves))
        ]
        if self.kind == "-inf":
            # The kernels give an empty leaf's norm, 0; as a partial of the
            # min over leaves it must be the min's identity, as Plan.leaf's.
            empty = self.identity()
            parts = [
                empty if x.numel() == 0 else q for x, q in zip(self.leaves, parts, strict=True)
            ]
        return parts

    # -- reductions --------------------------------------------------------------
    def _from_host(self, reduce: Callable[[], list[Partial]]) -> list[Partial]:
        # NaN/inf are reported through ClipStats, not NumPy's warnings (the
        # generic path's _compat.quiet covers NumPy leaves, not these views).
        with np.errstate(all="ignore"):
            parts = reduce()
        return [_as_torch(q, self.device) for q in parts]

    def leaf_parts(self) -> list[Partial]:
        """One partial per leaf: NumPy's dots on the CPU, the kernels or foreach norms elsewhere."""
        if self._host is not None:
            return self._from_host(self._host.leaf_parts)
        if self._kernels is not None:
            return self._kernel_parts(per_leaf=True)
        found = self._foreach_parts()
        return [found[i] if i in found else self.leaf(i) for i in range(len(self.leaves))]

    def example_part(self, index: int, axis: int, batch: int) -> Partial:
        """Per-example sums of squares: NumPy's dots on the CPU, the generic reduction elsewhere."""
        host = self._host
        if host is not None:
            return self._from_host(lambda: [host.example_part(index, axis, batch)])[0]
        return super().example_part(index, axis, batch)

    def global_parts(self) -> list[Partial]:
        """Partials whose merge is the global reduction."""
        if self._gathers():
            return self._cpu_global_parts()
        if self._host is not None:
            return self._from_host(self._host.global_parts)
        if self._kernels is not None:
            return self._kernel_parts(per_leaf=False)
        return self.leaf_parts()

    def _gathers(self) -> bool:
        """Whether :meth:`_cpu_global_parts` takes the norm (its copies would lose a graph)."""
        return (
            self._on_host
            and self.kind == "p"
            and self.p == 2
            and not self.zero_nonfinite
            and (not _torch().is_grad_enabled() or not any(map(_requires_grad, self.leaves)))
        )

    def _cpu_global_parts(self) -> list[Partial]:
        """The 2-norm of CPU leaves: small ones gathered by torch, large ones by rows or NumPy.

        - Leaves below ``_numpy._SMALL`` elements are gathered by torch, a
          dtype at a time (:func:`_gathered`), and each group is dotted in
          float64 as :class:`NumpyPlan` gathers and dots it: the same
          groups, so the same sums where the leaves of a work dtype have
          one dtype. That gather costs 0.2 to 0.5 us a tensor here, where a
          NumPy view of each (``Tensor.numpy``) cost 0.75 and ``bytes.join``
          0.4 more: 2.3 ms of a 2000-leaf tree.
        - Contiguous float32 leaves below ``_DIRECT`` elements are dotted
          where they are (:func:`_dsdots`), as NumPy dots them.
        - Larger float32 leaves are reduced by torch's row norms. NumPy's
          threads compete with torch's OpenMP workers, which spin for a
          while after every torch op (the backward pass, here): a
          64M-element norm took 12.3 ms on NumPy's threads after a torch
          copy, 9.9 ms after a NumPy one. ``torch.linalg.vector_norm`` of
          128-element rows runs on torch's own workers with float32 sums
          short enough to stay within 1e-6 (:func:`_rows_accurate`); the
          rows' squares are added in float64.
        - The rest (other large leaves, complex ones) through their NumPy
          views; a sum that overflowed or may have lost entries to
          underflow is redone by the overflow-safe generic reduction.
        """
        torch = _torch()
        leaves, sizes = self.leaves, self._sizes
        works = {d: _cpu_work(d) for d in self._dtype_infos}
        small: dict[Any, list[int]] = {}  # by torch dtype: the gather casts to the first's
        large: list[int] = []
        if len(works) == 1 and max(sizes) < _SMALL:  # all small: no per-leaf lookup
            ((dtype, work),) = works.items()
            if work is None:
                large = list(range(len(leaves)))
            else:
                small[dtype] = list(range(len(leaves)))
        else:
            for i, (x, n) in enumerate(zip(leaves, sizes, strict=True)):
                if n < _SMALL and works[x.dtype] is not None:
                    small.setdefault(x.dtype, []).append(i)
                else:
                    large.append(i)
        sums: list[float] = []
        redo: list[int] = []
        for dtype, members in small.items():
            work = works[dtype]
            assert work is not None  # (see above)
            if len(members) == len(leaves):
                part, part_sizes = leaves, sizes
            else:
                part, part_sizes = [leaves[i] for i in members], [sizes[i] for i in members]
            for (a, b), value in _gathered(work, part, part_sizes):
                if value is None:
                    redo.extend(members[a:b])
                else:
                    sums.append(value)
        # Dots and rows need a flat view: strided and channels_last leaves
        # have none and are reduced through their NumPy views.
        flat = [i for i in large if leaves[i].dtype == torch.float32 and leaves[i].is_contiguous()]
        if flat:
            direct = [i for i in flat if sizes[i] < _DIRECT] if _blas.dsdot() else []
            rows = [i for i in flat if sizes[i] >= _DIRECT] if _rows_accurate() else []
            found: list[tuple[int, float | None]] = []
            if direct:
                found += zip(direct, _dsdots([leaves[i] for i in direct]), strict=True)
            if rows:
                found += zip(rows, _rows_sumsqs([leaves[i] for i in rows]), strict=True)
            taken = set()
            for i, total in found:
                if total is not None:
                    sums.append(total)
                    taken.add(i)
            large = [i for i in large if i not in taken]
        total = _fsum(sums)  # no kept sum is huge: their total does not overflow (_HUGE)
        parts = [Partial(self.const(total), None, None)] if sums else []
        if large:
            views = _numpy_views([leaves[i] for i in large], {leaves[i].dtype for i in large})
            if views is None:
                redo.extend(large)
            else:
                sub = NumpyPlan(np, self.p, views)
                parts += self._from_host(sub.global_parts)
        parts += [self.leaf(i) for i in sorted(redo)]
        whole = bool(sums) and not large and not redo
        self.host_sumsq = total if whole else None
        return parts or [self.identity()]

    host_reciprocal = True  # number / tensor is tensor.reciprocal() * number in torch

    def host_sqrt(self, value: float) -> float:
        """The float64 root of torch's ``sqrt`` (SLEEF's): 1 ulp off IEEE's for 1% of values."""
        torch = _torch()
        return float(torch.sqrt(torch.tensor(value, dtype=torch.float64)))

    def _foreach_parts(self) -> dict[int, Partial]:
        """Partials of the leaves ``torch._foreach_norm`` reduces exactly, by index.

        Only ``ord=inf``, a max, which is exact in any dtype. torch's foreach
        p-norms add in float32 (its ``opmath``, on the CPU and in the CUDA
        kernel alike): float32 and bfloat16 squares overflow there, and even
        float16 ones lose more than 1e-6 over 1e5 elements (7e-5 seen on the
        CPU); they take the generic path, which adds in float64.
        """
        torch = _torch()
        if self.zero_nonfinite or self.kind != "inf":
            return {}
        out: dict[int, Partial] = {}
        for dtype, members in self._groups().items():
            if dtype.is_complex:
                continue
            # torch's foreach max of an empty tensor raises; such a leaf's
            # partial is the identity, from Plan.leaf.
            members = [i for i in members if self.leaves[i].numel()]
            if not members:  # and of an empty list of tensors
                continue
            norms = torch._foreach_norm([self.leaves[i] for i in members], self.p)
            for i, n in zip(members, norms, strict=True):
                out[i] = Partial(n.to(self.acc), None, None)
        return out

    def _groups(self) -> dict[Any, list[int]]:
        """Leaf indices by dtype, in leaf order."""
        if len(self._dtype_infos) == 1:
            return {self.leaves[0].dtype: list(range(len(self.leaves)))}
        groups: dict[Any, list[int]] = {}
        for i, x in enumerate(self.leaves):
            groups.setdefault(x.dtype, []).append(i)
        return groups

    @functools.cached_property
    def _sizes(self) -> list[int]:
        return list(map(_torch().Tensor.numel, self.leaves))

    def size(self) -> int:
        """Elements in all leaves."""
        return sum(self._sizes)

    # -- scaling -------------------------------------------------------------------
    def scale_leaves(self, scales: Any, *, per_leaf: bool, zero: bool, inplace: bool) -> list[Any]:
        """One foreach multiply per dtype (nothing written on the CPU when the scale is 1).

        The kernels scale CUDA tensors; per-leaf scales, ``nonfinite="zero"``
        and complex leaves go through the NumPy views on the CPU (in place),
        else the generic path. ``torch._foreach_mul_`` beats NumPy's threaded
        multiply on large CPU tensors here (10.0 against 11.6 ms on 64M
        float32), and costs about as much per small one. float16/bfloat16
        leaves off the CPU get the factor expanded to their shapes, which
        torch multiplies tensor by tensor (see the comment below).
        """
        torch = _torch()
        if inplace and self._kernels is not None:
            if self._kernel_scale(scales, per_leaf=per_leaf, zero=zero):
                _written(self.leaves)
                return list(self.leaves)
            # Tensors sharing memory: scaled one after the other (see
            # gradclip.cupy._fast._scaled), by the generic path.
            return super().scale_leaves(scales, per_leaf=per_leaf, zero=zero, inplace=True)
        complex_ = any(info is None or info.complex for info in self._dtype_infos.values())
        # torch's autograd of a foreach multiply by a 0-d tensor fails on
        # groups of two or more ("inconsistent range for TensorList output"):
        # a functional clip to differentiate through multiplies per tensor.
        # (Per-leaf scales may come as a list of 0-d tensors.)
        graph = (
            not inplace
            and torch.is_grad_enabled()
            and any(map(_requires_grad, [*_tensors(scales), *self.leaves]))
        )
        if per_leaf or zero or complex_ or graph:
            if inplace and self._host is not None:
                with np.errstate(all="ignore"):
                    # detach: a bound that requires grad (a learnable
                    # threshold) makes the scale require it, and such a
                    # tensor has no .numpy(); an in-place clip is not
                    # differentiated anyway.
                    self._host.scale_leaves(
                        scales.detach().numpy(), per_leaf=per_leaf, zero=zero, inplace=True
                    )
                _written(self.leaves)
                return list(self.leaves)
            return super().scale_leaves(scales, per_leaf=per_leaf, zero=zero, inplace=inplace)
        if inplace and self.device.type == "cpu" and scales.item() == 1:
            return list(self.leaves)  # reading the scale costs no device sync here
        groups = self._groups()
        if inplace and len(groups) > 1 and any(map(torch.Tensor.is_neg, self.leaves)):
            # torch's foreach refuses to write a negative-bit view (x.conj().imag):
            # a later group refused would leave the earlier ones written.
            return super().scale_leaves(scales, per_leaf=False, zero=False, inplace=True)
        out = list(self.leaves)
        with torch.no_grad() if inplace else contextlib.nullcontext():
            for dtype, members in groups.items():
                # float32 for float16/bfloat16 too: torch multiplies those in
                # float32 and rounds once (see Plan.factor_dtype).
                factor = scales.to(self.factor_dtype(dtype))
                tensors = out if len(members) == len(out) else [out[i] for i in members]
                factors: Any = factor
                if factor.dtype != dtype and self.device.type != "cpu":
                    # CUDA's foreach multiply by a 0-d tensor rounds it to the
                    # leaves' dtype first. A float32 factor expanded to each
                    # leaf's shape (no copy) takes part in type promotion as
                    # a tensor, so the product is float32, rounded once.
                    factors = [factor.expand(t.shape) for t in tensors]
                if inplace:
                    try:
                        torch._foreach_mul_(tensors, factors)
                    except RuntimeError:
                        if not any(map(torch.Tensor.is_neg, tensors)):
                            raise
                        # The one group, refused before any write (see above).
                        return super().scale_leaves(
                            scales, per_leaf=False, zero=False, inplace=True
                        )
                    continue
                for i, new in zip(members, torch._foreach_mul(tensors, factors), strict=True):
                    # a 0-d half leaf times the 0-d float32 factor is float32
                    out[i] = new if new.dtype == dtype else new.to(dtype)
        return out

    def _kernel_scale(self, scales: Any, *, per_leaf: bool, zero: bool) -> bool:
        """The scale kernel, in place (a block whose scale is 1 is not written).

        ``False``, with nothing launched, where two leaves share memory.
        """
        from ..cupy import _launch

        k = self._kernels
        assert k is not None
        with k.stream():
            reduced = self._reduced
            lay = reduced[0] if reduced is not None else _launch.layout_of(k.dev, *k.leaves)
            if lay.overlap:
                return False
            factors = k.from_torch(self.xp.astype(scales, self.res))
            _launch.scale(
                k.dev, lay, factors, per_leaf=per_leaf, res=self._res_np(), zero=zero, dst=None
            )
        return True


def _fast(fn: Callable[..., Any]) -> Callable[..., Any]:
    return functools.partial(fn, plan_cls=TorchPlan)


global_norm = _fast(_core.global_norm)
leaf_norms = _fast(_core.leaf_norms)
clip_by_global_norm = _fast(_core.clip_by_global_norm)
clip_by_norm = _fast(_core.clip_by_norm)
clip_by_block_rms = _fast(_core.clip_by_block_rms)


def clip_by_value(
    xp: Any,
    leaves: list[Any],
    names: Any,
    *,
    lo: Any,
    hi: Any,
    nonfinite: str,
    inplace: bool,
    plan_cls: type[Plan] = TorchPlan,
) -> list[Any]:
    """Clamp with ``torch._foreach_clamp_min_``/``max_``, a dtype at a time, as torch's own.

    One C++ loop over the tensors: the generic clamp's ops a tensor cost
    15 us each (31 ms for 2000 tensors, where torch's ``clip_grad_value_``
    takes 2). For number bounds and ``"propagate"`` (clamp keeps NaN, as
    ``maximum`` does); each bound is rounded once into the dtype first
    (:func:`gradclip._compat.number_in`), so that the op, which
    takes it through float32 for float16 and bfloat16, rounds nothing.
    Array bounds, the other policies and a functional clamp to
    differentiate through take the generic path.
    """
    torch = _torch()
    numbers = all(b is None or isinstance(b, int | float) for b in (lo, hi))
    graph = not inplace and torch.is_grad_enabled() and any(map(_requires_grad, leaves))
    if nonfinite != "propagate" or not numbers or graph:
        return _core.clip_by_value(
            xp, leaves, names, lo=lo, hi=hi, nonfinite=nonfinite, inplace=inplace
        )
    out = list(leaves)
    dtypes = set(map(operator.attrgetter("dtype"), leaves))
    for dtype in dtypes:
        members: Sequence[int] = range(len(leaves))
        if len(dtypes) > 1:
            members = [i for i, x in enumerate(leaves) if x.dtype == dtype]
        tensors = [out[i] for i in members]
        new = inplace
        for bound, op in ((lo, "clamp_min"), (hi, "clamp_max")):
            if bound is None:
                continue
            bound = _compat.number_in(xp, bound, dtype)
            if new:
                getattr(torch, f"_foreach_{op}_")(tensors, bound)
            else:  # the first op of a functional clamp makes the new tensors
                tensors, new = getattr(torch, f"_foreach_{op}")(tensors, bound), True
        if not new:  # no bound: copies, as the generic path gives
            tensors = [t.clone() for t in tensors]
        for i, t in zip(members, tensors, strict=True):
            out[i] = t
    return out


per_example_clip = _fast(_core.per_example_clip)
