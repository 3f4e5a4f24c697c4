"""Norm accumulation: overflow-safe, accurate, deterministic, branch-free.

A p-norm is accumulated as a pair ``(e, s)`` meaning ``norm**p = 2**(p*e) * s``.
Each block of a leaf is scaled by the power of two just below its largest
magnitude, which is exact, so ``s`` sums values in ``[0, 2**p)`` and can
neither overflow nor lose the small entries to underflow. Pairs are merged by
rescaling to the largest exponent, the way LAPACK's ``nrm2`` keeps a running
scale, but vectorised over all blocks at once and with ``where`` in place of
Python branches, so the code runs unchanged under ``jax.jit``.

For very large ``p`` a power of two is too coarse: a block's largest entry
scaled into ``[1, 2)`` has a ``p``-th power up to ``2**p``, which overflows
the accumulator (float64 from ``p`` near 1000; JAX's float32 near 85), and
one scaled into ``[0.5, 1)`` underflows. There (:func:`by_max`) each block is
divided by its largest magnitude instead, so its largest term is exactly 1,
and ``exp`` holds that magnitude itself: ``norm**p = exp**p * s``. The
division rounds, but each term only to within an ulp, which the ``p``-th
root gives back.

The scaling is skipped when the dtypes make it provably unnecessary (for
example float32 leaves with a float64 accumulator and ``p <= 6``): that is the
common case and costs one pass with no extra reduction.

The accumulator is float64 wherever the backend has it. Where it does not
(JAX without ``jax_enable_x64``) sums are taken by pairwise halving, whose
error grows with ``log n`` rather than ``n``.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from . import _compat

__all__ = ["Partial", "Plan", "parse_ord"]

# Upper bound on log2 of the element count of any tree we will see: the
# overflow test below must hold for a sum of this many largest values.
_LOG2_MAX_ELEMS = 42.0
# Below this many elements a float32 sum is taken directly.
_PAIRWISE_LEAF = 4096
# Below every exponent a partial can carry (float64's range is 2**+-1074).
_NO_EXP = -65536.0

_dtype = operator.attrgetter("dtype")
_shape = operator.attrgetter("shape")


def by_max(p: float, acc_max_exp2: float = 1024.0) -> bool:
    """Whether p-norms of order ``p`` are scaled by each block's maximum (see the module notes).

    Scaled by a power of two, ``sum(y**p)`` over ``2**42`` entries of ``y < 2``
    stays below ``2**(p + 42)``, which must fit the accumulator (float64:
    ``acc_max_exp2=1024``; float32: 128).

    Examples
    --------
    >>> by_max(2.0), by_max(1000.0), by_max(100.0), by_max(100.0, 128.0)
    (False, True, False, True)
    """
    return p > 0 and not math.isinf(p) and p + _LOG2_MAX_ELEMS >= acc_max_exp2 - 1


def parse_ord(ord: Any) -> float:
    """Validate ``ord`` like ``torch.nn.utils.get_total_norm``'s ``norm_type``.

    Accepts any float ``p > 0``, ``inf``, ``-inf`` and ``0`` (and strings that
    ``float`` parses to one of those).

    Examples
    --------
    >>> parse_ord(2), parse_ord("inf"), parse_ord(0.5)
    (2.0, inf, 0.5)
    >>> parse_ord(-1)
    Traceback (most recent call last):
    ...
    ValueError: ord must be a float > 0, inf, -inf or 0; got -1
    """
    bad = ValueError(f"ord must be a float > 0, inf, -inf or 0; got {ord!r}")
    if isinstance(ord, bool):
        raise bad
    try:
        p = float(ord)
    except (TypeError, ValueError):
        raise bad from None
    if math.isnan(p) or (p < 0 and not math.isinf(p)):
        raise bad
    return p


def new_blockwise(xp: Any, x: Any, fn: Callable[[Any], Any], chunk: int | None, device: Any) -> Any:
    """``fn(x)``, for an elementwise ``fn`` that keeps the dtype, written a block at a time.

    (See :meth:`Plan.new_leaf`; ``chunk`` ``None``: one block, ``fn(x)``.)
    """
    if chunk is None or math.prod(x.shape) <= chunk:
        return fn(x)
    out = xp.empty(x.shape, dtype=x.dtype, device=device)
    flat = xp.reshape(out, (-1,))
    for block in _compat.blocks(xp, x, chunk):
        new = fn(block.flat)
        if block.target is x:  # rows of a strided leaf
            out[block.index] = xp.reshape(new, block.shape)
        else:  # a range of the flattened leaf
            flat[block.index] = new
    return out


def root(xp: Any, value: Any, p: float) -> Any:
    """``value ** (1 / p)`` of a sum of powers (finite ``p > 0``), with derivative 0 at 0.

    The root's derivative is infinite at 0, where a clip's ``where`` sends
    the norm a zero cotangent: 0 * inf made ``jax.grad`` through the clip of
    an all-zero tree (or leaf, or example) NaN, where the clip is the identity.
    """
    if p == 1:
        return value
    live = value > 0  # False for NaN, which passes through
    safe = _compat.where(xp, live, value, xp.ones_like(value))
    return _compat.where(xp, live, xp.sqrt(safe) if p == 2 else safe ** (1.0 / p), value)


_HALF_MAX = {np.dtype(d): float(np.finfo(d).max) / 2 for d in (np.float32, np.float64)}


def host_norm(
    sumsq: float, dtype: np.dtype, sqrt: Callable[[float], float] = math.sqrt
) -> np.floating | None:
    """The 2-norm from a sum of squares held as a float, as :meth:`Plan.norm` gives it.

    The root in float64 (``sqrt``: the library's own where it is not
    correctly rounded), rounded once into ``dtype`` (the result dtype,
    float32 or float64): bit for bit what the generic code computes in 0-d
    arrays (see :meth:`Plan.host_clip`). ``None`` for a sum that is not
    finite (NaN gradients) or a norm near the top of ``dtype``'s range: the
    generic arithmetic decides those.
    """
    if not 0.0 <= sumsq < math.inf:
        return None
    root = sqrt(sumsq)
    return dtype.type(root) if root < _HALF_MAX[dtype] else None


def host_scale(
    norm: np.floating, max_norm: float, eps: float, reciprocal: bool = False
) -> np.floating | None:
    """``min(1, max_norm / (norm + eps))`` for a :func:`host_norm`, as ``_core._scale_from_norm``.

    Each operand is rounded into the norm's dtype first, and the sum, the
    comparison and the quotient are taken there, bit for bit the generic
    arithmetic for a Python bound; with ``reciprocal``, the quotient is
    ``max_norm`` times the rounded ``1 / (norm + eps)``, as torch divides a
    number by a tensor. ``None`` for a bound or ``eps`` near the top of the
    range (1e39 is inf in float32): the generic code decides.
    """
    kind = norm.dtype.type
    top = _HALF_MAX[norm.dtype]  # no sum below it overflows
    if not (max_norm < top and eps < top):
        return None
    denom = norm + kind(eps)
    bound = kind(max_norm)
    one: np.floating = kind(1.0)
    if not denom > bound:
        return one
    scale: np.floating = bound * (one / denom) if reciprocal else bound / denom
    return scale


class Partial(NamedTuple):
    """A reduction of some leaves that has not been turned into a norm yet.

    ``value`` is ``s`` for p-norms, the max for ``inf``, the min for ``-inf``
    and the nonzero count for ``0``, in the accumulator dtype. ``exp`` is the
    power-of-two exponent of a scaled p-norm, or ``None`` for 0. ``finite`` is
    set only where finiteness cannot be read off ``value``.
    """

    value: Any
    exp: Any
    finite: Any


@dataclass
class Plan:
    """Everything static about one norm computation: namespace, dtypes, ``ord``."""

    xp: Any
    p: float
    leaves: list[Any]
    zero_nonfinite: bool = False
    chunk: int | None = field(init=False)
    device: Any = field(init=False)
    acc: Any = field(init=False)
    res: Any = field(init=False)
    by_max: bool = field(init=False)
    _acc_info: Any = field(init=False)
    _dtype_infos: dict[Any, Any] = field(init=False)
    _warns_later: bool = field(init=False)
    # The 2-norm's global sum of squares as a Python float, where a fast
    # path's global_parts reduced every leaf into it (see host_clip); else None.
    host_sumsq: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        xp = self.xp
        self.device = _compat.device_of(self.leaves[0]) if self.leaves else None
        self.chunk = _compat.chunk_elems(xp)
        self._warns_later = _compat.warns_later(xp)
        # A handful of dtypes over up to thousands of leaves: look each up once.
        by_dtype = {d: _compat.dtype_info(xp, d) for d in set(map(_dtype, self.leaves))}
        wide = any(info is not None and info.float64 for info in by_dtype.values())
        self.res = xp.float64 if wide else xp.float32
        self.acc = xp.float64 if wide or _compat.has_float64(xp, self.device) else xp.float32
        self._acc_info = _compat.dtype_info(xp, self.acc)
        self._dtype_infos = by_dtype
        self.by_max = by_max(self.p, self._acc_info.max_exp2)

    def _host_norm(self) -> np.floating | None:
        if self.host_sumsq is None:
            return None
        dtype = np.dtype(np.float64 if self.res == self.xp.float64 else np.float32)
        return host_norm(self.host_sumsq, dtype, self.host_sqrt)

    def host_sqrt(self, value: float) -> float:
        """The float64 root the library's ``sqrt`` takes of a 0-d array (:func:`host_norm`)."""
        return math.sqrt(value)  # correctly rounded, as NumPy's (and IEEE's) sqrt

    # Whether the library divides a number by an array as the array's
    # reciprocal times the number (:func:`host_scale`): torch does.
    host_reciprocal = False

    def host_total(self) -> tuple[Any, Any] | None:
        """:meth:`total` from :attr:`host_sumsq`, computed on the host (see :meth:`host_clip`)."""
        norm = self._host_norm()
        if norm is None:
            return None
        return self.const(float(norm), self.res), self.const(True, self.xp.bool)

    def host_clip(self, max_norm: Any, eps: float) -> tuple[Any, Any, bool] | None:
        """The norm and scale (0-d arrays) of a global clip, from :attr:`host_sumsq`.

        Computed on the host in NumPy scalars (:func:`host_norm`,
        :func:`host_scale`), bit for bit what :meth:`total` and
        ``_core._scale_from_norm`` compute in 0-d arrays, at 2 to 5 us an op
        in torch: 40 us of a 20-tensor model's 200 per clip. The flag says
        the scale is 1. ``None`` unless :meth:`global_parts` gave every leaf
        to one float sum, for a bound given as a Python float, and where the
        host arithmetic leaves a value to the generic code. Every value was
        finite then: the finite flag is True.
        """
        norm = self._host_norm() if type(max_norm) is float else None
        scale = None if norm is None else host_scale(norm, max_norm, eps, self.host_reciprocal)
        if norm is None or scale is None:
            return None
        return self.const(float(norm), self.res), self.const(float(scale), self.res), scale == 1

    # -- small helpers ---------------------------------------------------------
    def info(self, index: int) -> Any:
        """The dtype facts (:func:`gradclip._compat.dtype_info`) of leaf ``index``."""
        return self._dtype_infos[self.leaves[index].dtype]

    def is_complex(self, index: int) -> bool:
        """Whether leaf ``index`` is complex (its magnitude is ``|z|``)."""
        info = self.info(index)
        return bool(info is not None and info.complex)

    @property
    def kind(self) -> str:
        """``"p"``, ``"inf"``, ``"-inf"`` or ``"zero"``."""
        if self.p == 0:
            return "zero"
        if math.isinf(self.p):
            return "inf" if self.p > 0 else "-inf"
        return "p"

    def const(self, value: float, dtype: Any = None) -> Any:
        """A 0-d array on the leaves' device (made there: no host copy to wait for)."""
        return _compat.asarray(self.xp, value, self.acc if dtype is None else dtype, self.device)

    def _wide_acc(self) -> bool:
        return bool(self.acc == self.xp.float64)

    def _needs_scaling(self, index: int) -> bool:
        info, acc = self.info(index), self._acc_info
        if self.kind != "p" or info is None:
            return False
        p = self.p
        top = p * (info.max_exp2 + (0.5 if info.complex else 0.0)) + _LOG2_MAX_ELEMS
        return bool(top >= acc.max_exp2 - 1 or p * info.tiny_exp2 < acc.normal_exp2)

    def _sum(self, v: Any) -> Any:
        xp = self.xp
        if self._wide_acc() or self.chunk is None:
            # JAX (XLA) and dask already reduce in trees; and JAX refuses to
            # slice a leaf sharded over an Explicit mesh axis into halves
            # its device count does not divide.
            return xp.sum(v)
        # float32 accumulator: pairwise halving keeps the error O(log n).
        # Compiled backends pass leaves unraveled, 0-d ones included.
        n = v.shape[0] if v.ndim else 0
        while n > _PAIRWISE_LEAF:
            half = n // 2
            head = v[:half] + v[half : 2 * half]
            v = xp.concat([head, v[2 * half :]]) if n % 2 else head
            n = v.shape[0]
        return xp.sum(v)

    def _powsum(self, y: Any) -> Any:
        if self.p == 2:
            return self._sum(y * y)
        if self.p == 1:
            return self._sum(y)
        return self._sum(y**self.p)

    def _magnitude(self, block: Any, complex: bool) -> Any:
        """``|block|`` in the accumulator dtype (complex is widened before ``abs``)."""
        xp = self.xp
        target = self.acc
        if complex:
            target = xp.complex128 if self._wide_acc() else xp.complex64
        return xp.abs(xp.astype(block, target, copy=False))

    def factor_dtype(self, dtype: Any) -> Any:
        """The dtype leaves of ``dtype`` are multiplied in: their own, float32 for float16/bfloat16.

        float16 and bfloat16 leaves are multiplied by the float32 scale and
        rounded once, as torch's ``mul_`` does (its ``opmath``): a scale
        rounded to the leaf's dtype first is off by up to half an ulp of
        it (1 ulp in 8% of bfloat16 products), and a scale below 6e-8
        becomes 0 in float16. Complex leaves: their real dtype.
        """
        info = self._dtype_infos[dtype]
        if info is not None and (info.complex or info.narrow):
            return self.xp.float64 if info.float64 else self.xp.float32
        return dtype

    def real_dtype(self, index: int) -> Any:
        """The dtype leaf ``index`` is multiplied in (:meth:`factor_dtype`)."""
        return self.factor_dtype(self.leaves[index].dtype)

    # -- reductions --------------------------------------------------------------
    def _whole(self, a: Any, largest: bool) -> Any:
        """The max (``largest``) or min of all of ``a``, a leaf's magnitudes."""
        if any(n != n for n in a.shape):  # dask, after boolean indexing
            return _compat.unknown_extreme(a, largest)
        return (self.xp.max if largest else self.xp.min)(a)

    def _extreme(self, a: Any, axis: int | None = None) -> Any:
        """The max (``inf``) or min (``-inf``) of ``a``, NaN if any entry is NaN."""
        xp = self.xp
        if axis is None:
            out = self._whole(a, self.kind == "inf")
        else:
            out = (xp.max if self.kind == "inf" else xp.min)(a, axis=axis)
        if _compat.reductions_drop_nan(xp):
            # XLA on the CPU reduces max/min with vector instructions that
            # drop NaN once an array has more than a few thousand entries
            # (jnp.max of 5000 ones and a NaN is 1); NumPy and torch keep it.
            out = xp.where(xp.any(xp.isnan(a), axis=axis), self.const(math.nan), out)
        return out

    def _block(self, a: Any, scaled: bool) -> Partial:
        xp = self.xp
        finite = None
        if self.zero_nonfinite or self.kind in ("-inf", "zero"):
            mask = xp.isfinite(a)
            finite = xp.all(mask)
            if self.zero_nonfinite:
                a = xp.where(mask, a, self.const(0.0))
        kind = self.kind
        if kind in ("inf", "-inf"):
            return Partial(self._extreme(a), None, finite)
        if kind == "zero":
            return Partial(xp.astype(_compat.count_nonzero(xp, a), self.acc), None, finite)
        if not scaled:
            return Partial(self._powsum(a), None, finite)
        # dask warns in the caller's compute(), outside gradclip's error
        # state: a NaN or inf would leave its block unscaled, and 1e200 beside
        # it overflow in the squares. Scaled by the finite entries' maximum,
        # the NaN or inf still reaches the sum, and nothing overflows.
        top_of = xp.where(xp.isfinite(a), a, self.const(0.0)) if self._warns_later else a
        m = self._whole(top_of, largest=True)
        if self.by_max:
            # 1 where there is nothing to scale by (all zeros, NaN or inf).
            top = xp.where(xp.isfinite(m) & (m > 0), m, self.const(1.0))
            return Partial(self._powsum(self.ratio(a, top)), top, finite)
        exp = self.exponent(m)
        return Partial(self._powsum(self.scale_down(a, exp)), exp, finite)

    def exponent(self, m: Any, e: Any = 0.0) -> Any:
        """The power-of-two exponent that scales magnitudes up to ``m * 2**e`` into ``[0, 2)``.

        Elementwise, so ``m`` may hold one maximum per block or per example.
        """
        xp = self.xp
        ok = xp.isfinite(m) & (m > 0)
        exp = xp.floor(xp.log2(xp.where(ok, m, self.const(1.0)))) + e
        # Over the whole range, subnormals included: scale_down applies it in
        # two halves. (Clamped to 2**-exp normal, subnormal float64 entries
        # came out near 2**-51, and their 30th power was 0.)
        acc = self._acc_info
        exp = xp.clip(exp, math.floor(acc.tiny_exp2), math.ceil(acc.max_exp2) - 1)
        return xp.where(ok, exp, self.const(0.0))

    def scale_down(self, a: Any, exp: Any) -> Any:
        """``a * 2**-exp``, exactly, as two powers of two that are finite and normal.

        One factor ``2**-exp`` would be subnormal or infinite at the ends of
        the range, and XLA on the CPU flushes subnormals to zero.
        """
        xp = self.xp
        two = self.const(2.0)
        half = xp.floor(exp / 2)
        return a * xp.pow(two, -half) * xp.pow(two, half - exp)

    def ratio(self, a: Any, top: Any) -> Any:
        """``a / top`` for a finite ``top > 0``, without forming ``1 / top``.

        XLA on the CPU may divide by a scalar as a multiply by its
        reciprocal, which is subnormal, so flushed to 0, for ``top >= 2**126``
        in float32: the ord-100 norm of [1e38, 1] came out as 0 (eager JAX).
        Both are scaled by the power of two below ``top`` first, exactly.
        A subnormal ``top`` is flushed there too, and every entry with it:
        their ratios are 0, not the 0 / 0 that made the norm NaN.
        """
        xp = self.xp
        exp = self.exponent(top)
        den = self.scale_down(top, exp)
        return self.scale_down(a, exp) / xp.where(den == 0, self.const(1.0), den)

    def leaf(self, index: int) -> Partial:
        """Reduce one leaf, block by block."""
        return self._blockwise(
            self.leaves[index], self._needs_scaling(index), self.is_complex(index)
        )

    def _blockwise(self, x: Any, scaled: bool, cplx: bool) -> Partial:
        parts = [
            self._block(self._magnitude(b.flat, cplx), scaled)
            for b in _compat.blocks(self.xp, x, self.chunk)
        ]
        if not parts:
            return self.identity()
        return self.merge(parts)

    def example_part(self, index: int, axis: int, batch: int) -> Partial:
        """Each example's ``sum(|g|**2)`` in leaf ``index`` (batch on ``axis``), as one partial.

        The partial holds ``(batch,)`` arrays. Eager backends reduce a group of
        examples at a time, so the temporaries stay near the block size (or one
        example, if that is larger) instead of the size of the leaf.
        """
        xp = self.xp
        x = self.leaves[index]
        row = math.prod(x.shape) // batch if batch else 0
        if row == 0:
            return Partial(xp.zeros((batch,), dtype=self.acc, device=self.device), None, None)
        scaled = self._needs_scaling(index)
        cplx = self.is_complex(index)
        if self.chunk is not None and row > self.chunk:
            # An example larger than a block (a layer of 16M entries): each is
            # reduced as a leaf is, or its widened magnitudes and squares
            # would be several times its size.
            ex = [
                self._blockwise(x[(slice(None),) * axis + (k, ...)], scaled, cplx)
                for k in range(batch)
            ]
            exps = xp.stack([q.exp for q in ex]) if scaled else None
            return Partial(xp.stack([q.value for q in ex]), exps, None)
        others = tuple(i for i in range(len(x.shape)) if i != axis)
        step = batch if self.chunk is None else max(1, self.chunk // row)
        values, exps = [], []
        for start in range(0, batch, step):
            piece = (
                x
                if step >= batch
                # array-api-strict refuses a stop past the end
                else x[(slice(None),) * axis + (slice(start, min(start + step, batch)), ...)]
            )
            a = self._magnitude(piece, cplx)
            if scaled:
                m = xp.max(a, axis=others, keepdims=True) if others else a
                exp = self.exponent(m)
                a = self.scale_down(a, exp)
                exps.append(xp.reshape(exp, (-1,)))
            values.append(xp.sum(a * a, axis=others) if others else a * a)

        def join(pieces: list[Any]) -> Any:
            return pieces[0] if len(pieces) == 1 else xp.concat(pieces)

        return Partial(join(values), join(exps) if scaled else None, None)

    def identity(self) -> Partial:
        """The reduction of no elements."""
        value = math.inf if self.kind == "-inf" else 0.0
        return Partial(self.const(value), None, _compat.asarray(self.xp, True, device=self.device))

    def merge(self, parts: list[Partial]) -> Partial:
        """Combine partial reductions in a fixed order (deterministic).

        Partials of per-example reductions hold one value per example: they
        are combined entry by entry.
        """
        if len(parts) == 1:
            return parts[0]
        xp = self.xp
        values = xp.stack([q.value for q in parts])
        explicit = any(q.finite is not None for q in parts)
        flags = [self.finite(q) for q in parts] if explicit else []
        finite = xp.all(xp.stack(flags), axis=0) if explicit else None
        kind = self.kind
        if kind in ("inf", "-inf"):
            return Partial(self._extreme(values, axis=0), None, finite)
        if kind == "zero" or all(q.exp is None for q in parts):
            return Partial(xp.sum(values, axis=0), None, finite)
        none = xp.full_like(values[0, ...], self.exp_none)
        exps = xp.stack([none if q.exp is None else q.exp for q in parts])
        top = xp.max(self.exp_live(values, exps), axis=0)
        terms, top = self.at_top(values, exps, top)
        return Partial(xp.sum(terms, axis=0), top, finite)

    @property
    def exp_none(self) -> float:
        """The ``exp`` of an unscaled partial: ``2**0`` or a maximum of 1."""
        return 1.0 if self.by_max else 0.0

    @property
    def exp_floor(self) -> float:
        """Below any ``exp`` a partial with a nonzero sum carries."""
        return 0.0 if self.by_max else _NO_EXP

    def exp_live(self, values: Any, exps: Any) -> Any:
        """``exps``, or a floor below them all where the sum is 0; their max is the common one.

        A sum of 0 (an empty or all-zero leaf) must not set the common
        exponent: at its 0 the tiny sums of other leaves (float64 values of
        1e-300) would be rescaled to 0.
        """
        return self.xp.where(values != 0, exps, self.const(self.exp_floor))

    def at_top(self, values: Any, exps: Any, top: Any) -> tuple[Any, Any]:
        """Sums ``values`` (scaled by ``exps``) rescaled to ``top``, the max of :meth:`exp_live`.

        Returns the rescaled sums and the common exponent (``top``, or the
        unscaled one where every sum is 0).
        """
        xp = self.xp
        top = xp.where(top == self.exp_floor, self.const(self.exp_none), top)
        # Zero sums get weight 1: 2**(p * (0 - top)) may overflow, and lazy
        # backends would warn about it in the user's code.
        live = values != 0
        e = xp.where(live, exps, top)
        if self.by_max:
            weights = self.ratio(e, top) ** self.p
        else:
            weights = xp.pow(self.const(2.0), self.p * (e - top))
        # Non-finite sums pass through unweighted: inf * 0 makes a NaN. Zero
        # sums become a constant 0: passed through, their cotangent would
        # miss the weight (jax.grad of an ord=1 norm by an all-zero leaf was
        # 2**top, not a subgradient).
        kept = xp.where(live, values, xp.zeros_like(values))
        return xp.where(live & xp.isfinite(values), values * weights, kept), top

    def norm(self, part: Partial, size: int, dtype: Any = None, factor: Any = None) -> Any:
        """Turn a partial reduction of ``size`` elements into a norm (in ``dtype``, default res).

        ``factor`` (0-d, in acc) multiplies the norm before its scale
        ``2**exp`` does: AMP's ``inv_scale``, so that a norm in range is
        right when the loss-scaled one is past the accumulator's (float64
        gradients near 1e308).
        """
        xp = self.xp
        dtype = self.res if dtype is None else dtype
        if size == 0:
            # Nothing was reduced: the norm of an empty leaf or tree is 0 for
            # every ord (the min over no elements would otherwise be inf).
            return self.const(0.0, dtype)
        value = part.value
        if self.kind == "p":
            value = root(xp, value, self.p)
        if factor is not None:
            value = value * factor
        if self.kind == "p" and part.exp is not None:
            value = value * (part.exp if self.by_max else xp.pow(self.const(2.0), part.exp))
        # A norm past float32 (1e39 for 1e4 entries of 1e37, whose rms is not)
        return self.cast(value, dtype)

    def cast(self, value: Any, dtype: Any) -> Any:
        """``xp.astype(value, dtype)``, unwarned where warnings come later.

        dask casts in the caller's ``compute()``, outside gradclip's error
        state, and warns of a value past a narrower float dtype's range
        (a norm, or a 0-d bound of 1e300): made +-inf first, as the cast
        rounds it.
        """
        xp = self.xp
        if self._warns_later and xp.isdtype(value.dtype, "real floating"):
            to = _compat._ml_dtypes_finfo(dtype) or np.finfo(dtype)  # bfloat16 too
            source = np.finfo(value.dtype)
            if source.max > to.max:
                top = (float(to.max) + 2.0**to.maxexp) / 2  # from here on, it rounds to inf
                inf = self.const(math.inf, value.dtype)
                value = xp.where(value >= top, inf, xp.where(value <= -top, -inf, value))
        info = _compat.dtype_info(xp, dtype)
        if info is not None and info.narrow and value.dtype == xp.float64:
            return _compat.round_once(xp, value, dtype)  # not through float32
        return xp.astype(value, dtype)

    def finite(self, part: Partial) -> Any:
        """0-d bool: every entry reduced into ``part`` was finite."""
        if part.finite is not None:
            return part.finite
        return self.xp.isfinite(part.value)

    # -- whole trees ---------------------------------------------------------------
    def leaf_parts(self) -> list[Partial]:
        """One partial per leaf."""
        return [self.leaf(i) for i in range(len(self.leaves))]

    def global_parts(self) -> list[Partial]:
        """Partials whose merge is the global reduction (a fast path may group leaves)."""
        return self.leaf_parts()

    def total(self, parts: list[Partial]) -> tuple[Any, Any]:
        """The global norm (result dtype) and the finite flag from per-leaf partials."""
        xp = self.xp
        if not parts:
            return self.const(0.0, self.res), _compat.asarray(xp, True, device=self.device)
        if self.kind == "zero":
            # torch's get_total_norm takes vector_norm(ord=0) of the per-leaf
            # norms: the number of leaves holding any nonzero entry.
            counts = xp.stack([q.value for q in parts])
            flags = [self.finite(q) for q in parts]
            nonzero = xp.astype(_compat.count_nonzero(xp, counts), self.res)
            return nonzero, xp.all(xp.stack(flags))
        merged = self.merge(parts)
        size = self.size()
        return self._unless_empty(self.norm(merged, size), size, self.leaves), self.finite(merged)

    def _unless_empty(self, norm: Any, size: float, leaves: Sequence[Any]) -> Any:
        """``norm``, or 0 where ``leaves`` of unknown length (``size`` NaN: dask) turn out empty.

        The min over no entries (``ord=-inf``) is its identity, inf; the norm
        of nothing is 0 for every ord. (``any`` of nothing is False.)
        """
        if size == size or self.kind != "-inf":
            return norm
        xp = self.xp
        some = [xp.any(xp.ones_like(x, dtype=xp.bool)) for x in leaves if math.prod(x.shape) != 0]
        return xp.where(xp.any(xp.stack(some)), norm, self.const(0.0, self.res))

    def size(self) -> int:
        """Elements in all leaves."""
        return sum(map(math.prod, map(_shape, self.leaves)))

    # -- scaling -------------------------------------------------------------------
    def scaled(self, index: int, block: Any, scale: Any, zero_nonfinite: bool) -> Any:
        """``block * scale`` in leaf ``index``'s dtype, NaN/inf entries zeroed if asked."""
        xp = self.xp
        real = self.real_dtype(index)
        factor = xp.astype(scale, real)
        complex_ = self.is_complex(index)
        finite = xp.isfinite(block) if zero_nonfinite else None
        src = block
        if finite is not None and (self._warns_later or self.chunk is None):
            # Products thrown away below are taken of zeros instead. dask:
            # inf * 0 (a zero scale) raises NumPy's invalid-value warning in
            # the caller's compute(), outside gradclip's errstate. JAX: the
            # derivative of a product thrown away is still taken, and NaN * 0
            # spread NaN into every entry's gradient (jax.grad through
            # nonfinite="zero"). (A pass more on eager backends, where
            # _compat.quiet silences NumPy instead; XLA fuses it.)
            src = _compat.where(xp, finite, block, xp.zeros_like(block))
        elif self._warns_later and complex_:
            # (inf + 0j times the factor + 0j warns likewise.)
            src = _compat.where(xp, factor == 1, xp.zeros_like(block), block)
        if self.info(index).narrow:  # in float32, rounded once (see factor_dtype)
            out = xp.astype(xp.astype(src, real) * factor, block.dtype)
        else:
            out = src * factor
        if complex_:
            # The libraries multiply by the complex factor + 0j, which turns
            # inf into inf + nanj: a scale of 1 (nonfinite="skip") must leave
            # the leaf as it is.
            out = _compat.where(xp, factor == 1, block, out)
        if finite is not None:
            out = _compat.where(xp, finite, out, xp.zeros_like(out))
        return _compat.as_array(out)

    def scale_leaves(self, scales: Any, *, per_leaf: bool, zero: bool, inplace: bool) -> list[Any]:
        """Multiply every leaf by its scale: new arrays, or block by block in place."""
        xp = self.xp
        out = []
        with _compat.no_grad(xp) if inplace else contextlib.nullcontext():
            for i, x in enumerate(self.leaves):
                s = scales[i] if per_leaf else scales
                if not inplace:
                    out.append(self._scaled_leaf(i, x, s, zero))
                    continue
                for block in _compat.blocks(xp, x, self.chunk):
                    block.write(xp, self.scaled(i, block.flat, s, zero))
                out.append(x)
        return out

    def _scaled_leaf(self, index: int, x: Any, scale: Any, zero: bool) -> Any:
        """Leaf ``index`` times ``scale``, a new array (see :meth:`new_leaf`)."""
        return self.new_leaf(x, lambda block: self.scaled(index, block, scale, zero))

    def new_leaf(self, x: Any, fn: Callable[[Any], Any]) -> Any:
        """``fn(x)`` for an elementwise ``fn`` that keeps the dtype, written a block at a time.

        On eager backends the temporaries of ``fn`` (a float16 leaf's
        float32 product, ``nonfinite="zero"``'s masks, a clamp's two steps)
        stay a block's, not the leaf's: several times its size otherwise.
        """
        return new_blockwise(self.xp, x, fn, self.chunk, self.device)

    def leaf_norms(self, parts: list[Partial]) -> Any:
        """1-d array of per-leaf norms (result dtype)."""
        xp = self.xp
        if not parts:
            return xp.zeros((0,), dtype=self.res, device=self.device)
        norms = []
        for q, x in zip(parts, self.leaves, strict=True):
            size = math.prod(x.shape)
            norms.append(self._unless_empty(self.norm(q, size), size, [x]))
        return xp.stack(norms)
