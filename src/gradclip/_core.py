"""The generic implementation: plain array-API code that takes ``xp``.

This is the reference every fast path is tested against. Functions here take
already-flattened, already-validated leaves plus their printable paths (for
error messages) and return new leaves; they never branch in Python on array
values except where ``nonfinite="raise"`` must, by definition, look.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from . import _compat
from ._norms import Partial, Plan
from ._stats import ClipStats, NonFiniteError, PerExampleStats

__all__ = [
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "global_norm",
    "leaf_norms",
    "per_example_clip",
]


def _check_finite(xp: Any, flags: list[Any], names: Sequence[str], fn: str = "") -> None:
    """Raise :class:`NonFiniteError` naming the first non-finite leaf (syncs once)."""
    if not flags or bool(xp.all(xp.stack(flags))):
        return
    raise_nonfinite(names, [i for i, flag in enumerate(flags) if not bool(flag)], fn)


def raise_nonfinite(names: Sequence[str], bad: Sequence[int], fn: str = "") -> None:
    """Raise :class:`NonFiniteError` naming leaf ``bad[0]``, if there is one.

    The advice names the policies ``fn`` takes (``per_example_clip`` has no
    ``"zero"`` or ``"skip"``).
    """
    if not bad:
        return
    others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    if fn == "per_example_clip":
        advice = 'Use nonfinite="propagate" and read each example\'s stats.finite.'
    else:
        advice = (
            'Use nonfinite="zero" to drop them (or, when clipping, nonfinite="skip" to leave '
            "the step unchanged)."
        )
    raise NonFiniteError(
        f"non-finite gradient values in leaf {names[bad[0]]}{others}; nothing was modified. "
        + advice
    )


def check_overflow(xp: Any, norm: Any, names: Sequence[str]) -> None:
    """``nonfinite="raise"``, the leaves found finite: a norm past its dtype raises.

    Every entry is finite, but a norm past the result dtype's range (float32
    gradients near 1e38) is inf: a clip's scale would be 0 and zero the
    gradients, which ``"raise"`` is there to prevent (torch's
    ``error_if_nonfinite`` raises on such a norm too). A 1-d ``norm`` holds
    one norm per leaf.
    """
    finite = xp.isfinite(norm)
    if bool(xp.all(finite)):
        return
    where = ""
    if norm.ndim:
        first = next(i for i in range(norm.shape[0]) if not bool(finite[i]))
        where = f" of leaf {names[first]}"
    dtype = str(norm.dtype).rsplit(".", 1)[-1]  # torch.float32 too
    raise NonFiniteError(
        f"the norm{where} overflows {dtype}, though every gradient value is finite: a clip's "
        "scale would be 0 and zero the gradients; nothing was modified. Use float64 "
        "gradients, or scale the loss down"
    )


def check_given(xp: Any, norm: Any, names: Sequence[str]) -> None:
    """``nonfinite="raise"`` with a given norm: the norm is checked, not the leaves.

    A given norm may already be all-reduced over ranks; a NaN in any leaf
    anywhere makes it NaN. A 1-d ``norm`` holds one norm per leaf.
    """
    finite = xp.isfinite(norm)
    if norm.ndim:
        _check_finite(xp, [finite[i] for i in range(norm.shape[0])], names)
    elif not bool(finite):
        raise NonFiniteError(f"the given norm is not finite ({norm}); nothing was modified")


def _reduce(
    plan: Plan, names: Sequence[str], nonfinite: str, *, per_leaf: bool = True, check: bool = True
) -> list[Partial]:
    """Reduce the leaves; ``nonfinite="raise"`` needs one partial per leaf to name it.

    ``check=False``: the caller checks them with the norms (:func:`_checked`).
    """
    if not per_leaf and nonfinite != "raise":
        return plan.global_parts()
    parts = plan.leaf_parts()
    if nonfinite == "raise" and check:
        _check_finite(plan.xp, [plan.finite(q) for q in parts], names)
    return parts


def _checked(plan: Plan, parts: list[Partial], names: Sequence[str], norms: Any) -> None:
    """``nonfinite="raise"``: every entry finite, and the norms too, in one host sync.

    Only where something is not does it look again, to name a leaf with a
    NaN or an infinity (:func:`_check_finite`), or else the norm that
    overflowed (:func:`check_overflow`).
    """
    xp = plan.xp
    flags = [plan.finite(q) for q in parts]
    ok = xp.all(xp.isfinite(norms))
    if flags:
        ok = ok & xp.all(xp.stack(flags))
    if bool(ok):
        return
    _check_finite(xp, flags, names)
    check_overflow(xp, norms, names)


def _stats(norm: Any, scale: Any, finite: Any) -> ClipStats:
    fields = (norm, scale, scale < 1, finite)
    return ClipStats(*(_compat.as_array(f) for f in fields))


def global_norm(
    xp: Any,
    leaves: list[Any],
    names: Sequence[str],
    *,
    p: float,
    nonfinite: str,
    plan_cls: type[Plan] = Plan,
) -> Any:
    """The norm of all leaves taken together (0-d, result dtype)."""
    plan = plan_cls(xp, p, leaves, zero_nonfinite=nonfinite == "zero")
    parts = _reduce(plan, names, nonfinite, per_leaf=False, check=False)
    quick = plan.host_total()
    norm = (quick or plan.total(parts))[0]
    if nonfinite == "raise":
        _checked(plan, parts, names, norm)
    return _compat.as_array(norm)


def leaf_norms(
    xp: Any,
    leaves: list[Any],
    names: Sequence[str],
    *,
    p: float,
    nonfinite: str,
    plan_cls: type[Plan] = Plan,
) -> Any:
    """One norm per leaf (1-d, result dtype)."""
    plan = plan_cls(xp, p, leaves, zero_nonfinite=nonfinite == "zero")
    parts = _reduce(plan, names, nonfinite, check=False)
    norms = plan.leaf_norms(parts)
    if nonfinite == "raise":
        _checked(plan, parts, names, norms)
    return norms


def _bound(plan: Plan, value: Any) -> Any:
    """A Python bound as is; an array bound (a device value, unchecked) in the result dtype.

    On dask a Python bound is made a 0-d array here, rounded to the result
    dtype now, under gradclip's error state: dask would round it in the
    caller's ``compute()`` (``max_norm=1e300`` to inf in float32, warned).
    """
    if isinstance(value, int | float):
        return plan.const(value, plan.res) if plan._warns_later else value
    return plan.cast(value, plan.res)


# The midpoint of float32's largest value and 2**128: from here on a number
# rounds to inf in float32 (a tie rounds to the even 2**128).
_FLOAT32_INF_FROM = (2 - 2**-24) * 2**127


def _infinite_in(plan: Plan, value: float) -> bool:
    """Whether the Python number ``value`` is infinite once rounded to the result dtype."""
    if plan.res == plan.xp.float64:
        return math.isinf(value)
    return abs(value) >= _FLOAT32_INF_FROM


def _scale_from_norm(plan: Plan, norm: Any, max_norm: Any, eps: float) -> Any:
    """``min(1, max_norm / (norm + eps))``, computed so that it cannot overflow.

    Dividing only where ``norm + eps > max_norm`` (so the ratio is below 1)
    keeps a zero or subnormal norm from overflowing the quotient, which lazy
    backends (dask) would report as a warning in the user's code. A NaN norm,
    or a NaN array ``max_norm`` (unchecked: checking would sync), still gives
    a NaN scale: torch's arithmetic, where a silent scale of 1 would hide it.
    So does an infinite norm under an infinite bound (``inf / inf``; the
    division is not done, where NumPy would warn of it), infinite in the
    result dtype: a bound of 1e39 is inf in float32, as torch and the fast
    paths (which take it as a float32 array) have it.
    """
    xp = plan.xp
    max_norm = _bound(plan, max_norm)
    one = plan.const(1.0, plan.res)
    denom = norm + eps
    over = denom > max_norm
    quotient = _compat.divide(xp, max_norm, _compat.where(xp, over, denom, one))
    scale = _compat.where(xp, over, quotient, one)
    # NaN where either is (both are >= 0 or NaN); a Python bound was checked.
    python = isinstance(max_norm, int | float)
    nan = denom if python else denom + max_norm
    if not python or _infinite_in(plan, max_norm):
        both = xp.isinf(denom) if python else xp.isinf(denom) & xp.isinf(max_norm)
        nan = _compat.where(xp, both, plan.const(math.nan, plan.res), nan)
    return _compat.where(xp, xp.isnan(nan), nan, scale)


def clip_by_global_norm(
    xp: Any,
    leaves: list[Any],
    names: Sequence[str],
    *,
    max_norm: Any,
    p: float,
    eps: float,
    nonfinite: str,
    norm: Any,
    inplace: bool,
    plan_cls: type[Plan] = Plan,
) -> tuple[list[Any], ClipStats]:
    """Scale every leaf by ``min(1, max_norm / (norm + eps))``."""
    zero = nonfinite == "zero"
    plan = plan_cls(xp, p, leaves, zero_nonfinite=zero)
    quick = None
    if norm is None:
        parts = _reduce(plan, names, nonfinite, per_leaf=False, check=False)
        if nonfinite in ("propagate", "skip"):
            quick = plan.host_clip(max_norm, eps)
        if quick is not None:  # every value finite: "skip" keeps the scale
            norm, scale, _ = quick
            finite = plan.const(True, xp.bool)
        else:
            norm, finite = plan.total(parts)
        if nonfinite == "raise":
            _checked(plan, parts, names, norm)
    else:
        norm = _compat.asarray(xp, norm, plan.res, plan.device)
        finite = xp.isfinite(norm)
        if nonfinite == "raise":
            check_given(xp, norm, names)
    if quick is None:
        scale = _scale_from_norm(plan, norm, max_norm, eps)
        if nonfinite == "skip":
            scale = _compat.where(xp, finite, scale, plan.const(1.0, plan.res))
    new = plan.scale_leaves(scale, per_leaf=False, zero=zero, inplace=inplace)
    return new, _stats(norm, scale, finite)


def clip_by_norm(
    xp: Any,
    leaves: list[Any],
    names: Sequence[str],
    *,
    max_norm: Any,
    p: float,
    eps: float,
    nonfinite: str,
    norm: Any,
    inplace: bool,
    plan_cls: type[Plan] = Plan,
) -> tuple[list[Any], ClipStats]:
    """Scale each leaf by ``min(1, max_norm / (its own norm + eps))``."""
    zero = nonfinite == "zero"
    plan = plan_cls(xp, p, leaves, zero_nonfinite=zero)
    if norm is None:
        parts = _reduce(plan, names, nonfinite, check=False)
        norms = plan.leaf_norms(parts)
        if nonfinite == "raise":
            _checked(plan, parts, names, norms)
        finite = (
            xp.stack([plan.finite(q) for q in parts])
            if parts
            else xp.zeros((0,), dtype=xp.bool, device=plan.device)
        )
    else:
        norms = xp.asarray(norm, dtype=plan.res, device=plan.device)
        if tuple(norms.shape) != (len(leaves),):
            shape = tuple(norms.shape)
            raise ValueError(
                f"norm= must hold one norm per leaf, shape ({len(leaves)},); got {shape}"
            )
        finite = xp.isfinite(norms)
        if nonfinite == "raise":
            check_given(xp, norms, names)
    scales = _scale_from_norm(plan, norms, max_norm, eps)
    if nonfinite == "skip":
        scales = _compat.where(xp, finite, scales, plan.const(1.0, plan.res))
    new = plan.scale_leaves(scales, per_leaf=True, zero=zero, inplace=inplace)
    return new, _stats(norms, scales, finite)


def block_rms(plan: Plan, part: Partial, size: int) -> Any:
    """A leaf's root mean square from its partial reduction (``ord=2``) of ``size`` entries."""
    xp = plan.xp
    norm = plan.norm(part, size)
    rms = norm / math.sqrt(max(size, 1))  # as the CUDA kernel computes it
    # The norm (1e39 for 1e4 entries of 1e37) may overflow the result
    # dtype where the rms does not, and inf / sqrt(n) zeroed the leaf:
    # there, the root of the mean of the squares.
    mean = plan.norm(part._replace(value=part.value / max(size, 1)), size)
    return xp.where(xp.isinf(norm) & xp.isfinite(mean), mean, rms)


def rms_scale(plan: Plan, rms: Any, threshold: Any) -> Any:
    """The scale ``1 / max(1, rms / threshold)`` of optax, where a zero rms is within any threshold.

    At ``threshold=0`` an all-zero leaf's ``0 / 0`` made the scale NaN (in
    optax too): it is 1 here, as ``clip_by_global_norm`` leaves a zero norm
    at ``max_norm=0``. A NaN rms still gives NaN.
    """
    xp = plan.xp
    one = plan.const(1.0, plan.res)
    threshold = _compat.asarray(xp, threshold, plan.res, plan.device)
    ratio = _compat.divide(xp, rms, xp.where(rms > 0, threshold, one))
    return _compat.divide(xp, 1.0, xp.maximum(one, ratio))


def clip_by_block_rms(
    xp: Any,
    leaves: list[Any],
    names: Sequence[str],
    *,
    threshold: Any,
    nonfinite: str,
    inplace: bool = False,
    plan_cls: type[Plan] = Plan,
) -> list[Any]:
    """Optax's ``clip_by_block_rms``: divide each leaf by ``max(1, rms / threshold)``.

    ``inplace``: a FlatTree's copy (see ``_api._working_copy``).
    """
    zero = nonfinite == "zero"
    plan = plan_cls(xp, 2.0, leaves, zero_nonfinite=zero)
    parts = _reduce(plan, names, nonfinite)
    threshold = _bound(plan, threshold)
    scales = []
    for x, part in zip(leaves, parts, strict=True):
        scale = rms_scale(plan, block_rms(plan, part, math.prod(x.shape)), threshold)
        if nonfinite == "skip":
            scale = xp.where(plan.finite(part), scale, plan.const(1.0, plan.res))
        scales.append(scale)
    # As clip_by_norm's, so the NumPy path multiplies into the outputs; a list,
    # indexed as the stacked norms are (torch's fake CUDA tensors cannot be),
    # but stacked in place, as clip_by_norm_'s are (torch's kernels take one array).
    if inplace:
        return plan.scale_leaves(xp.stack(scales), per_leaf=True, zero=zero, inplace=True)
    return plan.scale_leaves(scales, per_leaf=True, zero=zero, inplace=False)


def clip_by_value(
    xp: Any,
    leaves: list[Any],
    names: Sequence[str],
    *,
    lo: Any,
    hi: Any,
    nonfinite: str,
    inplace: bool,
    plan_cls: type[Plan] = Plan,
) -> list[Any]:
    """Clamp every entry to ``[lo, hi]`` (either bound may be ``None``, a number or a 0-d array)."""
    zero = nonfinite == "zero"
    plan = plan_cls(xp, math.inf, leaves)
    keep = None
    if nonfinite in ("raise", "skip"):
        flags = [plan.finite(q) for q in plan.leaf_parts()]
        if nonfinite == "raise":
            _check_finite(xp, flags, names)
        elif flags:
            keep = xp.logical_not(xp.all(xp.stack(flags)))

    made: dict[tuple[bool, Any], Any] = {}  # the bounds in each dtype, made once

    def bound(upper: bool, dtype: Any) -> Any:
        key = (upper, dtype)
        if key not in made:
            v = hi if upper else lo
            if _compat.is_array(v):  # a 0-d bound: dask would warn of 1e300 in compute()
                made[key] = plan.cast(v, dtype)
            else:
                made[key] = _compat.asarray(xp, v, dtype, plan.device)
        return made[key]

    def clamp(block: Any) -> Any:
        dtype = block.dtype
        out = block
        if zero:
            out = _compat.where(xp, xp.isfinite(out), out, xp.zeros_like(out))
        if lo is not None:
            out = xp.maximum(out, bound(False, dtype))
        if hi is not None:
            out = xp.minimum(out, bound(True, dtype))
        if keep is not None:
            out = _compat.where(xp, keep, block, out)
        return _compat.as_array(out)

    if not inplace:
        return [plan.new_leaf(x, clamp) for x in leaves]
    with _compat.no_grad(xp):
        for x in leaves:
            for block in _compat.blocks(xp, x, plan.chunk):
                block.write(xp, clamp(block.flat))
    return list(leaves)


# --------------------------------------------------------------------- per example


def _factors(plan: Plan, x: Any, scale: Any) -> Any:
    """The per-example ``scale`` in the dtype ``x`` is multiplied in (:meth:`Plan.factor_dtype`)."""
    info = plan._dtype_infos[x.dtype]
    work = x.dtype if info is None or info.complex else plan.factor_dtype(x.dtype)
    return plan.xp.astype(scale, work)


def _combine(plan: Plan, x: Any, scale: Any, axis: int, reduce: str | None) -> Any:
    """``x`` with example ``i`` (on ``axis``) multiplied by ``scale[i]``, summed if asked.

    The sum is a contraction over the batch axis (``matmul``, which reads
    ``x`` once and allocates only the result): no clipped per-example copy is
    made. (A product summed over axis 0 is no substitute even where a
    compiler fuses it: XLA on the CPU runs that reduction 20x slower.)

    float16/bfloat16 leaves are multiplied in float32 and rounded once
    (:meth:`Plan.factor_dtype`): a scale rounded to float16 first is a
    subnormal below 6e-5 (1% off) and 0 below 3e-8, so a heavily clipped
    example would vanish from the sum. Eager backends widen them a block at
    a time, so the float32 copy stays ``plan.chunk`` elements: a block of the
    columns after the batch axis, and of the rows before it where one column
    of all the rows is already larger (the batch last: it was the whole leaf).
    """
    xp = plan.xp
    shape = tuple(x.shape)
    batch = shape[axis]
    factors = _factors(plan, x, scale)
    work = factors.dtype
    out_shape = shape if reduce is None else shape[:axis] + shape[axis + 1 :]
    if math.prod(shape) == 0:  # nothing to scale or add (dask cannot reshape (3, 0, 2))
        return xp.zeros(out_shape, dtype=x.dtype, device=plan.device)
    pre, post = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
    three = (batch, post) if axis == 0 else (pre, batch, post)
    if plan.chunk is None:
        x3 = xp.reshape(x, three)
    else:
        x3 = _compat.view(xp, x, three)
        if x3 is None:  # a transposed or sliced leaf, which a reshape would copy whole
            return _combine_strided(plan, x, factors, axis, reduce, out_shape)
    rows, cols = pre, post
    if work != x.dtype and plan.chunk is not None:
        cols = min(post, max(1, plan.chunk // max(1, pre * batch)))
        if axis and cols == 1:
            cols = min(post, max(1, plan.chunk // batch))
            rows = max(1, plan.chunk // (batch * cols))
    column = xp.reshape(factors, (batch, 1) if axis == 0 else (1, batch, 1))

    def combined(part: Any) -> Any:
        block = xp.astype(part, work, copy=False)
        if reduce is None:
            y = block * column
        elif plan.chunk is None:
            # dask fuses the product into the sum, with no temporary.
            y = xp.sum(block * column, axis=-2)
        else:
            y = xp.matmul(factors, block)
        if reduce == "mean":
            y = y / batch  # after the sum (see per_example_clip)
        # (NumPy also multiplies ml_dtypes' bfloat16 into float32.)
        return y if y.dtype == x.dtype else xp.astype(y, x.dtype)

    if (rows, cols) == (pre, post):
        return xp.reshape(combined(x3), out_shape)
    # Blocks are written into the result as they come: gathered, then
    # joined, the result was held twice.
    summed = (post,) if axis == 0 else (pre, post)
    out = xp.empty(three if reduce is None else summed, dtype=x.dtype, device=plan.device)
    for r in range(0, pre, rows):
        for c in range(0, post, cols):
            # array-api-strict refuses a stop past the end
            cs, rs = slice(c, min(c + cols, post)), slice(r, min(r + rows, pre))
            part = (..., cs) if axis == 0 else (rs, slice(None), cs)
            to = part if reduce is None else (cs,) if axis == 0 else (rs, cs)
            out[to] = combined(x3[part])
    return xp.reshape(out, out_shape)


def _combine_strided(
    plan: Plan, x: Any, factors: Any, axis: int, reduce: str | None, out_shape: tuple[int, ...]
) -> Any:
    """:func:`_combine` of a leaf no reshape can view, on an eager backend.

    Groups of examples, sliced on the batch axis, are widened and multiplied
    (or contracted) one at a time, so the temporaries stay near
    ``plan.chunk`` elements, or one example where that is larger.
    """
    xp = plan.xp
    shape = tuple(x.shape)
    batch = shape[axis]
    assert plan.chunk is not None
    group = max(1, plan.chunk // (math.prod(shape) // batch))
    # The factors broadcast along the batch axis of a block.
    column = tuple(-1 if d == axis else 1 for d in range(len(shape)))
    out = xp.empty(out_shape, dtype=x.dtype, device=plan.device)
    total = None
    for start in range(0, batch, group):
        stop = min(start + group, batch)  # array-api-strict refuses a stop past the end
        index = (*(slice(None),) * axis, slice(start, stop), ...)
        block = xp.astype(x[index], factors.dtype, copy=False)
        f = factors[start:stop]
        if reduce is None:
            out[index] = xp.astype(block * xp.reshape(f, column), x.dtype, copy=False)
        elif total is None:
            total = xp.tensordot(f, block, axes=([0], [axis]))
        else:
            total += xp.tensordot(f, block, axes=([0], [axis]))
    if total is not None:
        if reduce == "mean":
            total = total / batch  # after the sum (see per_example_clip)
        out[...] = xp.astype(total, x.dtype, copy=False)
    return out


def per_example_clip(
    xp: Any,
    leaves: list[Any],
    names: Sequence[str],
    *,
    max_norm: Any,
    axes: Sequence[int],
    batch: int,
    per_layer: bool,
    reduce: str | None,
    eps: float,
    nonfinite: str,
    plan_cls: type[Plan] = Plan,
    parts_of: Callable[[Plan], list[Partial]] | None = None,
    combine: Callable[[Plan, Any, Any, int, str | None], Any] = _combine,
) -> tuple[list[Any], PerExampleStats]:
    """Clip each example (on ``axes[k]`` of leaf ``k``) to its bound, then reduce.

    ``max_norm`` is one bound (flat clipping: each example's norm is taken
    across all leaves) or, with ``per_layer``, one bound per leaf.
    ``parts_of(plan)`` gives every leaf's per-example partials where a fast
    path takes them all together (default: ``plan.example_part`` per leaf);
    ``combine`` scales (and sums) one leaf (default: :func:`_combine`).
    """
    plan = plan_cls(xp, 2.0, leaves)
    if parts_of is None:
        parts = [plan.example_part(i, axes[i], batch) for i in range(len(leaves))]
    else:
        parts = parts_of(plan)
    if nonfinite == "raise":
        _check_finite(xp, [xp.all(plan.finite(q)) for q in parts], names, "per_example_clip")
    if per_layer:
        # The sizes only tell plan.norm the leaf is not empty; an empty
        # example's sum is already 0.
        layer_norms = [plan.norm(q, 1) for q in parts]
        bounds = zip(layer_norms, max_norm, strict=True)
        scales = [_scale_from_norm(plan, n, c, eps) for n, c in bounds]
        norms, scale = xp.stack(layer_norms), xp.stack(scales)
        finite = xp.stack([plan.finite(q) for q in parts])
    else:
        merged = plan.merge(parts)
        norms = plan.norm(merged, 1)
        finite = plan.finite(merged)
        scale = _scale_from_norm(plan, norms, max_norm, eps)
    each = scales if per_layer else [scale] * len(leaves)
    # combine divides a mean after the sum, in the work dtype: scale / batch
    # may be subnormal (a scale of 5e-38 over 8 examples), which XLA flushes
    # to 0 and NumPy keeps with fewer digits, though the mean is not.
    out = [
        combine(plan, x, s, axes[k], reduce)
        for k, (x, s) in enumerate(zip(leaves, each, strict=True))
    ]
    clipped = scale < 1
    count = xp.sum(xp.astype(clipped, xp.int32), axis=-1, dtype=xp.int32)
    stats = PerExampleStats(norms, scale, clipped, count, finite)
    return out, PerExampleStats(*(_compat.as_array(f) for f in stats))
