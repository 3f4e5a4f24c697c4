"""The NumPy fast path: BLAS dots and in-place multiplies, spread over the cores.

Clipping is memory-bound: its floor is one read of every gradient for the
norm, plus one read and one write to scale. This path gets close to it by:

- reducing each leaf in pieces with BLAS dots (which release the GIL) and
  adding the pieces in float64. float32 pieces (``_DOT`` elements) go to
  ``dsdot`` (:mod:`gradclip._blas`), which adds in float64 at ``sdot``'s
  speed: ``np.dot`` adds in float32, and one large square among many small
  ones makes it lose the small ones (1e-4 relative). Without ``dsdot``
  they are widened to float64, like float16;
- cutting the large leaves into runs of pieces that every core takes from a
  shared queue; the pieces always start at the same offsets and their sums
  are added with ``math.fsum`` (exactly rounded, so in any order), so the
  norm is bit-identical whatever thread ran what;
- gathering small leaves into L2-sized buffers, one ``bytes.join`` (or
  ``np.concatenate``) and one dot per group instead of one call per leaf, on
  the calling thread while the pool streams the large leaves;
- upcasting float16/bfloat16 pieces into a reused float64 buffer;
- scaling in place with ``np.multiply(..., out=)``, and not writing at all when
  the scale is 1.

A float32 dot overflows for entries near 1e19 and loses entries below 1e-19;
such leaves (seen as an infinite, tiny or zero-but-nonzero-input sum) are
recomputed by the generic overflow-safe code, as are complex, strided and
non-2-norm cases. Everything else about the result (dtype, ``ClipStats``,
``nonfinite`` policies) is the generic :class:`~gradclip._norms.Plan`'s.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import operator
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _blas, _compat, _core
from ._norms import Partial, Plan, host_norm, host_scale
from ._stats import ClipStats

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

__all__ = [
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "global_norm",
    "leaf_norms",
    "per_example_clip",
]

_CHUNK = 1 << 17  # elements widened to float64 per BLAS call: the buffer fits in L2
# float32 elements per dsdot call, read where they are. Its error does not
# grow with the length (see gradclip._blas); pieces of _CHUNK were 10% slower
# on a 64M leaf than one call a task, in call overhead and prefetch restarts.
_DOT = _blas.PIECE
_TASK = 1 << 21  # elements a thread task takes, at most
# Below this many elements one thread does it all: waking another costs about
# 80 us here, more than it saves on data that sits in the L3 cache.
_PARALLEL = 1 << 22
_SMALL = 1 << 14  # leaves below this many elements are gathered for the norm
_GROUP = 1 << 18  # elements gathered per dot: the gather stays in L2
_THREADS = max(1, min(os.cpu_count() or 1, 8))
# float32 examples are dotted in pieces this long (see _example_sums)
_SHORT = 1 << 8

# Squared sums below these may have lost entries to underflow in the leaf's
# own precision (float32: squares below ~1e-38; float64: below ~1e-308).
_TINY = {np.dtype(np.float32): 2.0**-100, np.dtype(np.float64): 2.0**-900}
# Squared sums above this are redone by the generic reduction, which scales
# them: they are added unscaled (a tree's leaves, a group's ranks, the
# per-leaf sums "raise" merges), and such sums stay below float64's top for
# up to 2**123 of them. Only float64 leaves of 1e135 and more get here.
_HUGE = 2.0**900

_size = operator.attrgetter("size")
_dtype = operator.attrgetter("dtype")

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            # Imported here: at interpreter shutdown the import itself raises
            # (it registers an exit hook), and _run then works without a pool.
            from concurrent.futures import ThreadPoolExecutor

            _pool = ThreadPoolExecutor(_THREADS - 1, thread_name_prefix="gradclip")
        return _pool


def _forget_pool() -> None:
    """In a forked child: the pool's threads stayed in the parent.

    Its executor, copied, took tasks no thread would run (a hang in
    multiprocessing workers); the child makes its own.
    """
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_forget_pool)


def _run(tasks: Sequence[Callable[[], Any]], local: Callable[[], None] | None = None) -> list[Any]:
    """Run tasks on every core, the calling thread included; results in task order.

    ``local`` runs first on the calling thread: Python-bound work (one call
    per small leaf) that other threads could not overlap anyway because of
    the GIL, while the pool streams the large leaves. Then the calling thread
    takes tasks from the same queue as the pool. A single task runs here.
    """
    if local is not None:
        if len(tasks) <= 1:  # nothing to overlap: no hand-off at all
            local()
            return [task() for task in tasks]
    elif len(tasks) <= 1:
        return [task() for task in tasks]
    results: list[Any] = [None] * len(tasks)
    queue = itertools.count()  # next() is atomic under the GIL

    def drain() -> None:
        while (k := next(queue)) < len(tasks):
            results[k] = tasks[k]()

    def helper() -> None:
        # np.errstate is per thread: the caller's (see _compat.quiet) does
        # not reach the pool; NaN/inf arithmetic is reported through ClipStats.
        with np.errstate(all="ignore"):
            drain()

    futures = []
    try:
        for _ in range(min(_THREADS - 1, len(tasks) - 1)):
            futures.append(_executor().submit(helper))
    except RuntimeError:
        # The interpreter is shutting down (a thread left running after the
        # main one, an atexit hook): no new pool threads; drain() runs them all.
        pass
    try:
        if local is not None:
            local()
        drain()
    except BaseException:
        # A task raised here, or a signal handler did (KeyboardInterrupt): the
        # pool must not go on writing the caller's arrays after it has the
        # exception. Take the tasks nobody started, and wait for those running.
        while next(queue) < len(tasks):
            pass
        for future in futures:
            future.exception()  # waits; a pool task's own error yields to this one
        raise
    for future in futures:
        future.result()
    return results


def _fsum(values: Iterable[float]) -> float:
    """Exactly rounded sum, so independent of order; inf where it overflows."""
    try:
        return math.fsum(values)
    except OverflowError:
        return math.inf


_Run = list[tuple[int, int, int]]  # (leaf, start, stop) ranges of flattened leaves


def _runs(spans: list[tuple[int, int]]) -> list[_Run]:
    """Cut leaves ``(index, size)`` into runs of about equal size, one per task.

    Cuts fall on multiples of ``_DOT`` (a multiple of ``_CHUNK``) from the
    start of a leaf, so a leaf is always reduced in the same pieces whichever
    run holds them.
    """
    total = sum(size for _, size in spans)
    if total == 0:
        return []
    tasks = max(_THREADS, -(-total // _TASK)) if total >= _PARALLEL else 1
    quota = -(-total // tasks)
    runs: list[_Run] = [[]]
    room = quota
    for i, size in spans:
        start = 0
        while start < size:
            if room <= 0:
                runs.append([])
                room = quota
            stop = min(size, start + -(-room // _DOT) * _DOT)
            runs[-1].append((i, start, stop))
            room -= stop - start
            start = stop
    return runs


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_WORK: dict[np.dtype, np.dtype | None] = {}


def _work_dtype(dtype: np.dtype) -> np.dtype | None:
    """The dtype a leaf is dotted in, or ``None`` if it goes to the generic path.

    float32 stays float32 where BLAS has an accurate ``dsdot`` (it adds in
    float64); without one it is widened to float64 like float16.
    """
    if dtype == _F32:
        return _F32 if _blas.dsdot() else _F64
    try:
        return _WORK[dtype]
    except KeyError:
        # float16/bfloat16 pieces are widened to float64, not float32: a
        # float32 dot of squares with 8-11 significant bits rounds with a
        # bias (3e-6 on 4M bfloat16 values), and they are small to read.
        wide = dtype in (_F64, np.float16) or dtype.name == "bfloat16"
        work = _WORK[dtype] = _F64 if wide else None
        return work


def _sumsq_run(
    run: _Run, flats: dict[int, np.ndarray], works: dict[int, np.dtype]
) -> list[tuple[int, float]]:
    """``(leaf, sum of squares)`` of every piece of a run, by BLAS dot.

    float32 pieces are ``_DOT`` long, read in place by ``dsdot``; others are
    ``_CHUNK`` long, widened into a reused float64 buffer where needed.
    """
    out = []
    buf: np.ndarray | None = None
    for i, start, stop in run:
        flat, work = flats[i], works[i]
        if work == _F32:  # only where BLAS has dsdot (see _work_dtype)
            # one address per leaf, offsets per piece
            dsdot, address = _blas.dsdot(), _address(flat)
            assert dsdot is not None
            for a in range(start, stop, _DOT):
                at, n = address + 4 * a, min(_DOT, stop - a)
                out.append((i, dsdot(n, at, 1, at, 1)))
            continue
        for a in range(start, stop, _CHUNK):
            piece = flat[a : min(a + _CHUNK, stop)]
            if piece.dtype != work:  # float16/bfloat16 -> float64, into a reused buffer
                if buf is None:
                    buf = np.empty(_CHUNK, work)
                up = buf[: piece.size]
                up[...] = piece
                piece = up
            out.append((i, float(np.dot(piece, piece))))
    return out


def _sums(
    flats: dict[int, np.ndarray],
    works: dict[int, np.dtype],
    local: Callable[[], None] | None = None,
) -> dict[int, float]:
    """Each flat leaf's sum of squares: its pieces on every core, added exactly rounded."""
    runs = _runs([(i, flat.size) for i, flat in flats.items()])
    pieces: dict[int, list[float]] = {i: [] for i in flats}
    tasks = [functools.partial(_sumsq_run, run, flats, works) for run in runs]
    for result in _run(tasks, local):
        for i, value in result:
            pieces[i].append(value)
    return {i: _fsum(values) for i, values in pieces.items()}


def gather_groups(sizes: list[int]) -> list[tuple[int, int]]:
    """Ranges ``[a, b)`` of small leaves gathered into one buffer and dotted together.

    A group ends at the last leaf that ends within the next multiple of
    ``_GROUP`` elements, so a gather stays in L2 (below ``_GROUP + _SMALL``
    elements), and the same leaves always make the same groups, whoever
    gathers them (the NumPy path and the torch one agree bit for bit). The
    result is shared: the caller must not change it.
    """
    if sum(sizes) <= _GROUP:  # one group: no cut points
        return [(0, len(sizes))]
    return _cut(tuple(sizes))


@functools.lru_cache(maxsize=8)  # layouts: a model's parameter groups, say
def _cut(sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """:func:`gather_groups` past one group: 60 us on 2000 leaves here, so kept per layout."""
    ends = np.cumsum(sizes)
    cuts = np.searchsorted(ends, np.arange(_GROUP, ends[-1], _GROUP), side="right")
    bounds = [0, *np.unique(cuts).tolist(), len(sizes)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if a < b]


def _sumsq_gathered(arrays: list[np.ndarray], work: np.dtype, direct: bool) -> float:
    """Sum of squares of ``arrays`` gathered into one buffer of dtype ``work``.

    ``direct``: every array already has dtype ``work``. Then ``bytes.join``
    gathers them: it copies each C-contiguous buffer with one memcpy, about
    0.2 us per array, where ``np.concatenate`` sets up a cast and an
    iterator for each (0.75 us: 1.5 ms of a 2000-leaf tree). It refuses
    other layouts with a TypeError, and those groups are concatenated.
    """
    if direct:
        try:
            # ndarray has the buffer protocol; NumPy's stubs do not declare it.
            joined = b"".join(arrays)  # type: ignore[arg-type]
        except TypeError:  # a strided leaf
            pass
        else:
            if work == _F32:  # ctypes hands dsdot the bytes' own address
                dsdot = _blas.dsdot()
                assert dsdot is not None  # float32 is dotted as it is only where there is one
                n = len(joined) // 4
                return dsdot(n, joined, 1, joined, 1)
            return _sumsq(np.frombuffer(joined, work))
    # axis=None flattens every leaf, whatever its shape or layout; "unsafe"
    # only because ml_dtypes' bfloat16 has no "same_kind" cast: every cast
    # here widens (or is the identity).
    buf = np.concatenate(arrays, axis=None, dtype=work, casting="unsafe")
    return _sumsq(buf)


def _sumsq(x: np.ndarray) -> float:
    """Sum of squares of a contiguous 1-d float32 (by ``dsdot``) or float64 array."""
    if x.dtype == _F32:
        dsdot = _blas.dsdot()
        assert dsdot is not None  # float32 is dotted as it is only where there is one
        address = _address(x)
        return dsdot(x.size, address, 1, address, 1)
    return float(np.dot(x, x))


def _address(x: np.ndarray) -> int:
    """The address of a C-contiguous array's data.

    A ctypes view of a writable one tells it in 0.25 us; ``x.ctypes.data``
    costs 1 to 2 (a 20-leaf model's clip took 10 us of them).
    """
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(x))  # type: ignore[arg-type]
    except (TypeError, ValueError):  # read-only (a writable view is refused), or empty
        return int(x.ctypes.data)


def _trusted(work: np.dtype, sumsq: float, arrays: Iterable[np.ndarray]) -> bool:
    """Whether a dot-based sum of squares over ``arrays`` is exact enough to keep.

    An infinite sum overflowed, and a huge one may overflow when added to
    others (see ``_HUGE``); a tiny one, or a zero one over nonzero input,
    lost entries to underflow. NaN is kept: it propagates either way.
    """
    if sumsq > _HUGE:
        return False
    if sumsq == 0.0:
        return not any(a.any() for a in arrays)
    return math.isnan(sumsq) or sumsq >= _TINY[work]


def _example_sums(x: np.ndarray, batch: int) -> np.ndarray | None:
    """Each example's sum of squares (batch on axis 0), by BLAS dots; ``None``: not here.

    - float32: each example in ``_SHORT``-entry pieces, all the pieces of the
      leaf in one batched ``matmul`` of row vectors, which NumPy hands to
      BLAS's ``sdot``; the pieces are added in float64. Pieces that short
      keep ``sdot``'s float32 sums within 1e-6 (:func:`gradclip._blas.short_sdot`
      checks this BLAS), at the speed of whole-row dots; one ``dsdot`` call
      per example costs 0.8 us of Python, twice the time on the dp tree.
      Where the check fails, rows are widened to float64 a block at a time.
    - float64: the same ``matmul`` on ``_CHUNK``-entry pieces.

    ``None`` for other dtypes (the generic reduction, scaled, takes them),
    strided leaves, and any example whose sum may have overflowed or lost
    entries to underflow: the generic reduction redoes the leaf.
    """
    if x.dtype not in (_F32, _F64) or not x.flags.c_contiguous:
        return None
    rows = x.reshape(batch, -1)
    width = rows.shape[1]
    tiny = _TINY[x.dtype]  # squares taken in the leaf's own dtype may underflow
    total = np.zeros(batch, np.float64)
    if x.dtype == _F64 or _blas.short_sdot(_SHORT):
        piece = _CHUNK if x.dtype == _F64 else _SHORT
        main = width // piece * piece
        if main:
            blocks = rows[:, :main].reshape(batch, main // piece, piece)
            dots = np.matmul(blocks[:, :, None, :], blocks[:, :, :, None])[:, :, 0, 0]
            total += dots.sum(axis=1, dtype=np.float64)
        if main < width:
            tail = rows[:, main:]
            total += np.matmul(tail[:, None, :], tail[:, :, None])[:, 0, 0]
    else:
        tiny = _TINY[_F64]
        group = max(1, _CHUNK // max(width, 1))  # examples per block
        for r in range(0, batch, group):
            for c in range(0, width, _CHUNK):
                block = rows[r : r + group, c : c + _CHUNK].astype(_F64)
                total[r : r + group] += np.einsum("ij,ij->i", block, block)
    with np.errstate(invalid="ignore"):
        doubtful = (total > _HUGE) | (total < tiny)  # NaN stays: it propagates
    if doubtful.any():
        # A sum of 0 is right only where the example is all zeros (padding).
        suspects = np.flatnonzero(doubtful)
        if total[suspects].any():
            return None
        # Read a block of rows at a time: rows[suspects] copies them all (the
        # whole leaf, where every example is zeros).
        group = max(1, _CHUNK // max(width, 1))
        if group == 1:  # a row is a view
            pieces = (rows[i] for i in suspects)
        else:
            pieces = (rows[suspects[i : i + group]] for i in range(0, suspects.size, group))
        if any(piece.any() for piece in pieces):
            return None
    return total


class NumpyPlan(Plan):
    """:class:`Plan` with BLAS reductions and threaded in-place scaling."""

    _sizes: list[int]
    _small: Sequence[int]  # a range where every leaf is small
    _large: list[int]

    def __post_init__(self) -> None:
        super().__post_init__()
        # Leaves of fewer than _SMALL elements cost more in Python calls than
        # in memory traffic: they are gathered for the norm and scaled on the
        # calling thread.
        self._sizes = sizes = list(map(_size, self.leaves))
        if sizes and max(sizes) < _SMALL:  # all small: no index lists to compute
            self._small, self._large = range(len(sizes)), []
        elif len(sizes) < 256:
            self._small = [i for i, n in enumerate(sizes) if n < _SMALL]
            self._large = [i for i, n in enumerate(sizes) if n >= _SMALL]
        else:  # thousands of leaves: index lists made by NumPy, not a loop
            counts = np.array(sizes, dtype=np.int64)
            self._small = np.flatnonzero(counts < _SMALL).tolist()
            self._large = np.flatnonzero(counts >= _SMALL).tolist()

    def size(self) -> int:
        """Elements in all leaves (already counted)."""
        return sum(self._sizes)

    def _fast(self) -> bool:
        return self.kind == "p" and self.p == 2 and not self.zero_nonfinite

    def _dots(
        self, indices: list[int], local: Callable[[], None] | None = None
    ) -> dict[int, float]:
        """Sums of squares of the contiguous real leaves among ``indices``, on every core."""
        flats: dict[int, np.ndarray] = {}
        works: dict[int, np.dtype] = {}
        for i in indices:
            x = self.leaves[i]
            work = _work_dtype(x.dtype)
            if work is not None and x.flags.c_contiguous:  # else: complex or strided
                flats[i], works[i] = x.reshape(-1), work
        return _sums(flats, works, local)

    def leaf_parts(self) -> list[Partial]:
        """Per-leaf partials, computed with threaded BLAS dots."""
        if not self._fast():
            return super().leaf_parts()
        sums = self._dots(list(range(len(self.leaves))))
        parts = []
        for i, x in enumerate(self.leaves):
            value, work = sums.get(i), _work_dtype(x.dtype)
            if value is not None and work is not None and _trusted(work, value, [x]):
                parts.append(Partial(np.float64(value), None, None))
            else:
                parts.append(self.leaf(i))
        return parts

    def _gather(
        self, small: dict[np.dtype, Sequence[int]], out: list[tuple[Any, float, Sequence[int]]]
    ) -> None:
        """Sums of squares of small leaves, one gather and one dot per ``_GROUP`` elements."""
        one_dtype = len(self._dtype_infos) == 1
        for work, members in small.items():
            if len(members) == len(self.leaves):  # all of them, in order
                arrays, sizes = self.leaves, self._sizes
            else:
                arrays = list(map(self.leaves.__getitem__, members))
                sizes = list(map(self._sizes.__getitem__, members))
            direct = set(self._dtype_infos if one_dtype else map(_dtype, arrays)) == {work}
            for a, b in gather_groups(sizes):
                value = _sumsq_gathered(arrays[a:b], work, direct)
                out.append((work, value, members[a:b]))

    def global_parts(self) -> list[Partial]:
        """Partials for the global norm: one for every sum BLAS got right, plus redone leaves."""
        if not self._fast():
            return super().global_parts()
        small: dict[np.dtype, Sequence[int]] = {}
        big = list(self._large)
        if len(self._dtype_infos) == 1:  # the common case, without a per-leaf dtype lookup
            work = _work_dtype(self.leaves[0].dtype)
            if work is not None:
                small[work] = self._small
            else:
                big = list(range(len(self.leaves)))
        else:
            by_work: dict[np.dtype, list[int]] = {}
            for i in self._small:
                work = _work_dtype(self.leaves[i].dtype)
                if work is not None:
                    by_work.setdefault(work, []).append(i)
                else:
                    big.append(i)
            small.update(by_work)
        small = {work: members for work, members in small.items() if members}
        groups: list[tuple[Any, float, Sequence[int]]] = []
        sums = self._dots(big, local=functools.partial(self._gather, small, groups))
        for i, value in sums.items():
            groups.append((_work_dtype(self.leaves[i].dtype), value, [i]))
        kept: list[float] = []
        redo = [i for i in big if i not in sums]  # complex or strided
        for work, value, members in groups:
            if _trusted(work, value, (self.leaves[i] for i in members)):
                kept.append(value)
            else:
                redo.extend(members)
        total = _fsum(kept)  # no kept sum is huge: their total does not overflow (_HUGE)
        self.host_sumsq = total if kept and not redo else None
        parts = [self.leaf(i) for i in sorted(redo)]
        if kept:
            parts.append(Partial(np.float64(total), None, None))
        return parts or [self.identity()]

    def example_part(self, index: int, axis: int, batch: int) -> Partial:
        """Per-example sums of squares by BLAS dots where exact (see :func:`_example_sums`)."""
        sums = _example_sums(self.leaves[index], batch) if axis == 0 and batch else None
        if sums is None:
            return super().example_part(index, axis, batch)
        return Partial(sums, None, None)

    def scale_leaves(self, scales: Any, *, per_leaf: bool, zero: bool, inplace: bool) -> list[Any]:
        """Threaded ``np.multiply(..., out=)``; leaves with scale 1 are not written.

        float16/bfloat16 leaves are multiplied by a float32 factor and
        rounded once (:meth:`Plan.factor_dtype`).
        """
        infos = self._dtype_infos
        if zero or any(info is None or info.complex for info in infos.values()):
            return super().scale_leaves(scales, per_leaf=per_leaf, zero=zero, inplace=inplace)
        real = {d: self.factor_dtype(d) for d in infos}
        leaves = self.leaves
        unit = np.asarray(scales) == 1  # on the host (NumPy's device); a list of scales too
        if not per_leaf and inplace and unit:
            return list(leaves)  # the scale is 1: nothing to write
        # Native byte order and the leaf's ndarray subclass, as the generic
        # path's x * scale gives, except a np.memmap: there x * scale is a
        # plain array (a memmap without a file is no memmap).
        outs = (
            leaves
            if inplace
            else [
                np.empty_like(x, x.dtype.newbyteorder("="), subok=not isinstance(x, np.memmap))
                for x in leaves
            ]
        )
        small, large = self._small, self._large
        if per_leaf:
            factors = [np.asarray(scales[i]).astype(real[x.dtype]) for i, x in enumerate(leaves)]
            if inplace:  # a leaf whose scale is 1 is not written
                small = [i for i in small if not unit[i]]
                large = [i for i in large if not unit[i]]
        else:
            # 0-d arrays, not NumPy scalars: x *= scalar is 3x slower per call.
            by_dtype = {d: np.asarray(scales).astype(real[d]) for d in infos}
            if len(by_dtype) == 1:
                factors = [*by_dtype.values()] * len(leaves)
            else:
                factors = list(map(by_dtype.__getitem__, map(_dtype, leaves)))
        spans = []
        for i in large:
            if leaves[i].flags.c_contiguous and outs[i].flags.c_contiguous:
                spans.append((i, self._sizes[i]))
            else:
                small = [*small, i]  # strided: one multiply call handles the layout
        flats = {i: (leaves[i].reshape(-1), outs[i].reshape(-1)) for i, _ in spans}
        runs = _runs(spans)
        if inplace and len(runs) > 1 and _overlap([leaves[i] for i in (*small, *flats)]):
            # The same memory given twice is scaled twice (as torch's foreach
            # clip does), one write after the other: threads each reading
            # it before the other writes would scale some entries once. The
            # small and strided leaves count too: this thread writes them
            # while the pool writes the runs.
            runs = [[piece for run in runs for piece in run]]
        tasks = [functools.partial(_scale_run, run, flats, factors) for run in runs]
        # Small leaves cost a Python call each, which threads cannot overlap
        # (the GIL): they run here while the pool streams the large ones.
        # x *= f casts "same_kind", which ml_dtypes has not from float32 to bfloat16.
        imul = inplace and all(d == r for d, r in real.items())
        _run(tasks, local=functools.partial(_multiply_each, leaves, outs, small, factors, imul))
        return list(outs)


def _overlap(arrays: list[np.ndarray]) -> bool:
    """Whether two of these arrays may share memory (one array given twice, say).

    Arrays over the memory of distinct NumPy owners cannot; other arrays
    are compared by the range of addresses they span (a microsecond an
    array), so two strided views that interleave without sharing an entry
    count as overlapping. Owners say nothing about foreign memory: every
    NumPy view of a torch tensor has that tensor as its base, ``x`` and
    ``x.view(-1)`` two different ones.
    """
    owners = [x if x.base is None else x.base for x in arrays]
    if len(set(map(id, owners))) == len(owners) and all(
        type(o) is np.ndarray and o.base is None for o in owners
    ):
        return False
    spans = np.array([_byte_span(x) for x in arrays if x.size], np.int64).reshape(-1, 2)
    return spans_overlap(spans[:, 0], spans[:, 1])


def spans_overlap(starts: np.ndarray, stops: np.ndarray) -> bool:
    """Whether two of the address ranges ``[starts[i], stops[i])`` meet (none may be empty)."""
    order = np.argsort(starts, kind="stable")
    begin, end = starts[order], stops[order]
    return bool(np.any(begin[1:] < np.maximum.accumulate(end)[:-1]))


def _byte_span(x: np.ndarray) -> tuple[int, int]:
    """The addresses a non-empty array's entries lie within: ``[start, stop)``."""
    start = stop = x.ctypes.data
    for n, step in zip(x.shape, x.strides, strict=True):
        if step < 0:
            start += (n - 1) * step
        else:
            stop += (n - 1) * step
    return start, stop + x.itemsize


def _scale_run(
    run: _Run, flats: dict[int, tuple[np.ndarray, np.ndarray]], factors: list[np.ndarray]
) -> None:
    for i, start, stop in run:
        src, dst = flats[i]
        # "unsafe": a float32 product rounded to float16/bfloat16 (see scale_leaves)
        np.multiply(src[start:stop], factors[i], out=dst[start:stop], casting="unsafe")


def _multiply_each(
    leaves: list[np.ndarray],
    outs: list[np.ndarray],
    indices: Sequence[int],
    factors: list[np.ndarray],
    imul: bool,
) -> None:
    if imul:  # in place, x *= f through map: no bytecode per leaf, and cheaper than out=
        xs: Iterable[np.ndarray] = leaves
        fs: Iterable[np.ndarray] = factors
        if len(indices) < len(leaves):
            xs, fs = map(leaves.__getitem__, indices), map(factors.__getitem__, indices)
        deque(map(operator.imul, xs, fs), maxlen=0)
    else:
        for i in indices:
            np.multiply(leaves[i], factors[i], out=outs[i], casting="unsafe")


def clip_buffer_(x: np.ndarray, max_norm: float, eps: float) -> ClipStats | None:
    """:func:`clip_by_global_norm_` of one float32/float64 buffer (``ord=2``, ``"propagate"``).

    What :class:`NumpyPlan` computes, bit for bit: the same BLAS pieces and
    exactly rounded sum, the host arithmetic of :func:`host_norm` and
    :func:`host_scale`, the same threaded multiply. It skips the plan's
    machinery, which a FlatTree's buffer does not need: on a 2000-leaf
    model's 8 MB buffer, its caches cold from the gradients' own traffic,
    that Python took 0.4 ms of 0.9.
    ``None`` (nothing written) where the plan must do it: other dtypes and
    layouts, a buffer small enough to be gathered (its sum would come from
    a copy), a sum that may have overflowed or lost entries, a norm or a
    bound the host arithmetic leaves to the generic one.
    """
    dtype = x.dtype
    if dtype not in (_F32, _F64) or x.size < _SMALL or not x.flags.c_contiguous:
        return None
    work = _work_dtype(dtype)
    assert work is not None
    flat = x.reshape(-1)
    sumsq = _sums({0: flat}, {0: work})[0]
    norm = host_norm(sumsq, dtype) if _trusted(work, sumsq, [x]) else None
    scale = None if norm is None else host_scale(norm, max_norm, eps)
    if norm is None or scale is None:
        return None
    if scale != 1:
        factor = [np.asarray(scale)]
        runs = _runs([(0, flat.size)])
        _run([functools.partial(_scale_run, run, {0: (flat, flat)}, factor) for run in runs])
    return ClipStats(np.asarray(norm), np.asarray(scale), np.asarray(scale < 1), np.asarray(True))


def _fast(fn: Callable[..., Any]) -> Callable[..., Any]:
    return functools.partial(fn, plan_cls=NumpyPlan)


global_norm = _fast(_core.global_norm)
leaf_norms = _fast(_core.leaf_norms)
clip_by_global_norm = _fast(_core.clip_by_global_norm)
clip_by_norm = _fast(_core.clip_by_norm)
clip_by_block_rms = _fast(_core.clip_by_block_rms)
per_example_clip = _fast(_core.per_example_clip)


def clip_by_value(
    xp: Any,
    leaves: list[np.ndarray],
    names: Any,
    *,
    lo: Any,
    hi: Any,
    nonfinite: str,
    inplace: bool,
    plan_cls: type[Plan] = NumpyPlan,
) -> list[Any]:
    """In place, for number bounds and ``"propagate"``: one ``np.maximum`` (``np.minimum``) a leaf.

    Each call writes its leaf (``out=``), the bound made once per dtype
    (rounded once into it); the generic clamp's blocks cost 5 us a leaf,
    11 ms of a 2000-leaf tree. A functional clamp, array bounds and the
    other policies take the generic path, whose results keep each leaf's
    layout rules.
    """
    numbers = all(b is None or isinstance(b, int | float) for b in (lo, hi))
    if not inplace or nonfinite != "propagate" or not numbers:
        return _core.clip_by_value(
            xp, leaves, names, lo=lo, hi=hi, nonfinite=nonfinite, inplace=inplace
        )
    for bound, op in ((lo, np.maximum), (hi, np.minimum)):
        if bound is not None:
            made = {d: _compat.asarray(np, bound, d) for d in set(map(_dtype, leaves))}
            for x in leaves:  # out= as a keyword: 0.8 us a call, positional 1.9
                op(x, made[x.dtype], out=x)
    return list(leaves)
