"""The NumPy fast path: BLAS dots and in-place multiplies, spread over the cores.

Clipping is memory-bound: its floor is one read of every gradient for the
norm, plus one read and one write to scale. This path gets close to it by:

- reducing each leaf in ``_CHUNK``-element pieces with ``np.dot`` (BLAS, which
  releases the GIL) and adding the pieces in float64, so a 64M-element float32
  leaf keeps a relative error near 1e-8;
- cutting the work into fixed segments that a thread pool runs on every core;
  results are stored by segment and added in segment order, so the norm is
  bit-identical whatever thread ran what;
- gathering small leaves into one scratch buffer, one dot per group instead
  of one Python call per leaf;
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

import functools
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from . import _core
from ._norms import Partial, Plan

__all__ = [
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "global_norm",
    "leaf_norms",
]

_CHUNK = 1 << 17  # elements per BLAS call: fits in L2, error ~1e-8 on 64M
_TASK = 1 << 21  # elements per thread task
_SMALL = 1 << 14  # leaves below this many elements are gathered for the norm
_THREADS = max(1, min(os.cpu_count() or 1, 8))

# Squared sums below these may have lost entries to underflow in the leaf's
# own precision (float32: squares below ~1e-38; float64: below ~1e-308).
_TINY = {np.dtype(np.float32): 2.0**-100, np.dtype(np.float64): 2.0**-900}

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="gradclip")
        return _pool


def _quiet(task: Callable[[], Any]) -> Any:
    # np.errstate is per thread: the caller's (see _compat.quiet) does not
    # reach the pool, and NaN/inf arithmetic is reported through ClipStats.
    with np.errstate(all="ignore"):
        return task()


def _run(tasks: list[Callable[[], Any]], local: Callable[[], None] | None = None) -> list[Any]:
    """Run tasks on every core, results in task order; ``local`` runs here meanwhile."""
    if _THREADS == 1 or (len(tasks) <= 1 and local is None):
        results = [task() for task in tasks]
        if local is not None:
            local()
        return results
    futures = [_executor().submit(_quiet, task) for task in tasks]
    if local is not None:
        local()
    return [future.result() for future in futures]


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_WORK: dict[np.dtype, np.dtype | None] = {}


def _work_dtype(dtype: np.dtype) -> np.dtype | None:
    """The dtype a leaf is dotted in, or ``None`` if it goes to the generic path."""
    try:
        return _WORK[dtype]
    except KeyError:
        if dtype == _F32:
            work: np.dtype | None = _F32
        elif dtype in (_F64, np.float16) or dtype.name == "bfloat16":
            # float16/bfloat16 pieces are widened to float64, not float32: a
            # float32 dot of squares with 8-11 significant bits rounds with a
            # bias (3e-6 on 4M bfloat16 values), and they are small to read.
            work = _F64
        else:
            work = None
        _WORK[dtype] = work
        return work


def _sumsq(flat: np.ndarray, work: np.dtype) -> float:
    """Sum of squares of a 1-D array, BLAS dot per chunk, float64 total."""
    total = 0.0
    if flat.dtype == work:
        for start in range(0, flat.size, _CHUNK):
            piece = flat[start : start + _CHUNK]
            total += float(np.dot(piece, piece))
        return total
    buf = np.empty(min(_CHUNK, flat.size), work)
    for start in range(0, flat.size, _CHUNK):
        piece = flat[start : start + _CHUNK]
        up = buf[: piece.size]
        up[...] = piece  # float16/bfloat16 -> float64
        total += float(np.dot(up, up))
    return total


def _trusted(work: np.dtype, sumsq: float, arrays: list[np.ndarray]) -> bool:
    """Whether a dot-based sum of squares over ``arrays`` is exact enough to keep.

    An infinite sum overflowed; a tiny one, or a zero one over nonzero input,
    lost entries to underflow. NaN is kept: it propagates either way.
    """
    if math.isinf(sumsq):
        return False
    if sumsq == 0.0:
        return not any(a.any() for a in arrays)
    return math.isnan(sumsq) or sumsq >= _TINY[work]


def _segments(size: int) -> list[tuple[int, int]]:
    return [(start, min(start + _TASK, size)) for start in range(0, size, _TASK)]


class NumpyPlan(Plan):
    """:class:`Plan` with BLAS reductions and threaded in-place scaling."""

    def _fast(self) -> bool:
        return self.kind == "p" and self.p == 2 and not self.zero_nonfinite

    def _checked(self, work: np.dtype, sumsq: float, indices: list[int]) -> list[Partial]:
        """Keep a dot-based sum over ``indices``, or redo those leaves overflow-safely."""
        if _trusted(work, sumsq, [self.leaves[i] for i in indices]):
            return [Partial(np.float64(sumsq), None, None)]
        return [self.leaf(i) for i in indices]

    def _dot_parts(self, indices: list[int]) -> list[Partial]:
        """One partial per leaf in ``indices``, from threaded BLAS dots where possible."""
        works: dict[int, np.dtype] = {}
        tasks: list[Callable[[], float]] = []
        owner: list[int] = []
        for i in indices:
            x = self.leaves[i]
            work = _work_dtype(x.dtype)
            if work is None or not x.flags.c_contiguous:
                continue  # complex or strided: the generic reduction below
            works[i] = work
            flat = x.reshape(-1)
            for start, stop in _segments(flat.size):
                tasks.append(functools.partial(_sumsq, flat[start:stop], work))
                owner.append(i)
        sums = dict.fromkeys(works, 0.0)
        for i, value in zip(owner, _run(tasks), strict=True):
            sums[i] += value  # segment order: deterministic
        parts = []
        for i in indices:
            parts.extend(self._checked(works[i], sums[i], [i]) if i in works else [self.leaf(i)])
        return parts

    def leaf_parts(self) -> list[Partial]:
        """Per-leaf partials, computed with threaded BLAS dots."""
        if not self._fast():
            return super().leaf_parts()
        return self._dot_parts(list(range(len(self.leaves))))

    def global_parts(self) -> list[Partial]:
        """Partials for the global norm only: small leaves are gathered per dtype."""
        if not self._fast():
            return super().global_parts()
        small: dict[np.dtype, list[int]] = {}
        big: list[int] = []
        for i, x in enumerate(self.leaves):
            work = _work_dtype(x.dtype)
            if work is not None and x.size < _SMALL:  # any layout: concatenate copies
                small.setdefault(work, []).append(i)
            else:
                big.append(i)
        parts = self._dot_parts(big)
        for work, members in small.items():
            parts.extend(self._gathered(work, members))
        return parts

    def _gathered(self, work: np.dtype, members: list[int]) -> list[Partial]:
        """Reduce small leaves ``_TASK`` elements at a time through a scratch buffer."""
        groups: list[list[int]] = [[]]
        filled = 0
        for i in members:
            size = self.leaves[i].size
            if filled + size > _TASK and groups[-1]:
                groups.append([])
                filled = 0
            groups[-1].append(i)
            filled += size

        def reduce(group: list[int]) -> float:
            pieces = [self.leaves[i] for i in group]
            pieces = [x if x.ndim == 1 else x.reshape(-1) for x in pieces]
            # "unsafe" only because ml_dtypes' bfloat16 has no "same_kind"
            # cast; every cast here widens (or is the identity).
            return _sumsq(np.concatenate(pieces, dtype=work, casting="unsafe"), work)

        sums = _run([functools.partial(reduce, g) for g in groups])
        parts = []
        for group, value in zip(groups, sums, strict=True):
            parts.extend(self._checked(work, value, group))
        return parts

    def scale_leaves(self, scales: Any, *, per_leaf: bool, zero: bool, inplace: bool) -> list[Any]:
        """Threaded ``np.multiply(..., out=)``; leaves with scale 1 are not written."""
        if zero or any(info is None or info.complex for info in self._infos):
            return super().scale_leaves(scales, per_leaf=per_leaf, zero=zero, inplace=inplace)
        outs = [x if inplace else np.empty_like(x) for x in self.leaves]
        tasks: list[Callable[[], Any]] = []
        small: list[tuple[np.ndarray, Any, np.ndarray]] = []
        factors: dict[np.dtype, Any] = {}
        unit = np.asarray(scales == 1)  # one comparison, on the host (NumPy's device)
        if not per_leaf and inplace and unit:
            return outs  # the scale is 1: nothing to write
        factor: Any
        for i, (x, out) in enumerate(zip(self.leaves, outs, strict=True)):
            if per_leaf:
                if inplace and unit[i]:
                    continue
                factor = np.asarray(scales[i]).astype(x.dtype)
            else:
                factor = factors.get(x.dtype)
                if factor is None:
                    factor = factors[x.dtype] = np.asarray(scales).astype(x.dtype)
            if x.size < _SMALL or not (x.flags.c_contiguous and out.flags.c_contiguous):
                small.append((x, factor, out))
                continue
            src, dst = x.reshape(-1), out.reshape(-1)
            for start, stop in _segments(x.size):
                tasks.append(
                    functools.partial(np.multiply, src[start:stop], factor, out=dst[start:stop])
                )
        # Small leaves cost a Python call each, which threads cannot overlap
        # (the GIL): they run here while the pool streams the large ones.
        _run(tasks, local=functools.partial(_multiply_all, small, inplace))
        return outs


def _multiply_all(batch: list[tuple[np.ndarray, Any, np.ndarray]], inplace: bool) -> None:
    if inplace:
        for x, factor, _ in batch:
            x *= factor  # cheaper per call than np.multiply(..., out=)
    else:
        for x, factor, out in batch:
            np.multiply(x, factor, out=out)


def _fast(fn: Callable[..., Any]) -> Callable[..., Any]:
    return functools.partial(fn, plan_cls=NumpyPlan)


global_norm = _fast(_core.global_norm)
leaf_norms = _fast(_core.leaf_norms)
clip_by_global_norm = _fast(_core.clip_by_global_norm)
clip_by_norm = _fast(_core.clip_by_norm)
clip_by_block_rms = _fast(_core.clip_by_block_rms)
clip_by_value = _core.clip_by_value
