"""The CuPy fast path: gradclip's functions on the raw kernels of ``_kernels.cu``.

Registered in ``gradclip._api._FAST_PATHS`` for CuPy leaves. A global clip is
two launches whatever the number of leaves: the norm kernel (per-leaf and
global norms, the scale, the finite flag, all in device memory) and the scale
kernel, which leaves a block untouched when the scale is 1. No host sync
except for ``nonfinite="raise"``, which must look.

Leaves the kernels do not take (non-contiguous ones) send the call to the
generic path, which gives the same results. Every function takes
``device=``, where the tests pass a CPU emulation of the kernels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _core
from .._norms import Plan, by_max
from .._stats import ClipStats
from . import _launch
from ._launch import Device

__all__ = [
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "global_norm",
    "leaf_norms",
    "per_example_clip",
]


def _device(leaves: Sequence[Any], device: Device | None) -> Device | None:
    """The device to run on, or None when the kernels cannot take these leaves."""
    if not _launch.supported(leaves):
        return None
    if device is not None:
        return device
    return _launch.CupyDevice(leaves[0].device.id)


def _kind(p: float) -> str:
    if p == 0:
        return "zero"
    if math.isinf(p):
        return "inf" if p > 0 else "-inf"
    return "p"


def _check(dev: Device, out: _launch.Outputs, names: Sequence[str], norms: str | None) -> None:
    """``nonfinite="raise"``: the host sync, naming the first non-finite leaf.

    ``norms``: ``"global"`` or ``"leaf"``, the norms the call returns or
    clips by, which raise where they overflowed though every entry is
    finite (:func:`gradclip._core.check_overflow`); ``None``, no norms.
    """
    flags = np.asarray(_host(out.leaf(dev, 3)))
    _core.raise_nonfinite(names, np.flatnonzero(~flags).tolist())
    if norms is not None:
        got = _host(out.norm(dev) if norms == "global" else out.leaf(dev, 0))
        _core.check_overflow(np, np.asarray(got), names)


def _host(x: Any) -> Any:
    get = getattr(x, "get", None)  # cupy.ndarray.get; NumPy arrays (the emulator) are there
    return x if get is None else get()


def _reduce(
    dev: Device,
    leaves: Sequence[Any],
    names: Sequence[str],
    *,
    p: float,
    nonfinite: str,
    lay: _launch.Layout | None = None,
    norms: str | None = None,
    **bound: Any,
) -> tuple[_launch.Layout, _launch.Outputs]:
    """Launch the norm kernel; with ``nonfinite="raise"``, raise before anything is written.

    ``lay``: the leaves' layout where the caller has it (a lookup reads every
    leaf). ``norms``: as for :func:`_check`.
    """
    lay = lay or _launch.layout(dev, leaves)
    out = _launch.outputs(dev, len(leaves), lay.res)
    _launch.norm(dev, lay, out, kind=_kind(p), p=p, zero=nonfinite == "zero", **bound)
    if nonfinite == "raise":
        _check(dev, out, names, norms)
    return lay, out


def _max_norm(xp: Any, max_norm: Any, res: Any) -> Any:
    """A Python bound as is; an array bound in the result dtype, on the device."""
    return max_norm if isinstance(max_norm, int | float) else xp.astype(max_norm, res)


def _new_leaves(dev: Device, lay: _launch.Layout, leaves: Sequence[Any]) -> tuple[Any, list[Any]]:
    """One buffer for a functional call's outputs, and the leaves as views into it."""
    buf = dev.empty(lay.out_bytes)
    views = [
        dev.view(buf, offset, tuple(x.shape), x.dtype)
        for offset, x in zip(lay.out_offsets, leaves, strict=True)
    ]
    return buf, views


def _scaled(
    dev: Device,
    xp: Any,
    lay: _launch.Layout,
    out: _launch.Outputs,
    leaves: Sequence[Any],
    *,
    per_leaf: bool,
    zero: bool,
    inplace: bool,
) -> list[Any]:
    """Launch the scale kernel with the scales the norm kernel left in ``out``."""
    scales = out.leaf(dev, 1) if per_leaf else out.scale(dev)
    if inplace and lay.overlap:
        # Memory given twice is scaled twice (as torch's foreach clip does),
        # one write after the other. In one launch, blocks of the two
        # leaves would read and write it at once: some entries scaled once,
        # differently from run to run. Leaf by leaf, in stream order:
        plan = Plan(xp, 2.0, list(leaves))
        return plan.scale_leaves(scales, per_leaf=per_leaf, zero=zero, inplace=True)
    buf, new = (None, list(leaves)) if inplace else _new_leaves(dev, lay, leaves)
    _launch.scale(dev, lay, scales, per_leaf=per_leaf, res=out.res, zero=zero, dst=buf)
    return new


def _entry(generic: Any, body: Any) -> Any:
    """``body(dev, xp, leaves, names, ...)`` where the kernels take the leaves, else ``generic``."""

    def fn(
        xp: Any, leaves: list[Any], names: Sequence[str], *, device: Device | None = None, **kw: Any
    ) -> Any:
        dev = _device(leaves, device)
        # The kernels scale p-norms by powers of two, which overflow for very large p.
        if dev is None or by_max(kw.get("p", 2.0)):
            return generic(xp, leaves, names, **kw)
        return body(dev, xp, leaves, names, **kw)

    fn.__doc__ = getattr(body, "func", body).__doc__  # through functools.partial
    return fn


def _global_norm(dev: Device, xp: Any, leaves: list[Any], names: Sequence[str], **kw: Any) -> Any:
    """The norm of all leaves (0-d, result dtype), one launch."""
    return _reduce(dev, leaves, names, norms="global", **kw)[1].norm(dev)


def _leaf_norms(dev: Device, xp: Any, leaves: list[Any], names: Sequence[str], **kw: Any) -> Any:
    """One norm per leaf (1-d, result dtype), one launch."""
    return _reduce(dev, leaves, names, norms="leaf", **kw)[1].leaf(dev, 0)


def _clip(
    dev: Device,
    xp: Any,
    leaves: list[Any],
    names: Sequence[str],
    *,
    mode: str,
    max_norm: Any,
    p: float,
    eps: float,
    nonfinite: str,
    norm: Any,
    inplace: bool,
) -> tuple[list[Any], ClipStats]:
    """clip_by_global_norm (mode "global") and clip_by_norm (mode "leaf")."""
    per_leaf = mode == "leaf"
    lay = _launch.layout(dev, leaves)
    res = lay.res
    bound = {
        "mode": mode,
        "skip": nonfinite == "skip",
        "max_norm": _max_norm(xp, max_norm, res),
        "eps": eps,
    }
    if norm is None:
        _, out = _reduce(dev, leaves, names, p=p, nonfinite=nonfinite, lay=lay, norms=mode, **bound)
    else:
        out = _launch.outputs(dev, len(leaves), res)
        # A copy: the kernels read the norms packed from the array's start,
        # and a view (a column, a reversed or broadcast array) is not.
        given = xp.asarray(norm, dtype=res, copy=True)
        # (A global norm's shape is checked by gradclip._api for every backend.)
        if per_leaf and tuple(given.shape) != (len(leaves),):
            raise ValueError(
                f"norm= must hold one norm per leaf, shape ({len(leaves)},); got "
                f"{tuple(given.shape)}"
            )
        if nonfinite == "raise":
            _core.check_given(xp, given, names)
        _launch.given(dev, lay, out, given, **bound)
    zero = nonfinite == "zero"
    new = _scaled(dev, xp, lay, out, leaves, per_leaf=per_leaf, zero=zero, inplace=inplace)
    if per_leaf:
        stats = ClipStats(*(out.leaf(dev, k) for k in (0, 1, 2, 3)))
    else:
        stats = ClipStats(out.norm(dev), out.scale(dev), out.clipped(dev), out.finite(dev))
    return new, stats


def _clip_by_block_rms(
    dev: Device,
    xp: Any,
    leaves: list[Any],
    names: Sequence[str],
    *,
    threshold: Any,
    nonfinite: str,
    inplace: bool = False,
) -> list[Any]:
    """The ``clip_by_block_rms`` of optax: two launches (new arrays, or a FlatTree's copy)."""
    skip = nonfinite == "skip"
    lay = _launch.layout(dev, leaves)
    bound = _max_norm(xp, threshold, lay.res)
    _, out = _reduce(
        dev,
        leaves,
        names,
        p=2.0,
        nonfinite=nonfinite,
        lay=lay,
        mode="rms",
        skip=skip,
        max_norm=bound,
    )
    return _scaled(
        dev, xp, lay, out, leaves, per_leaf=True, zero=nonfinite == "zero", inplace=inplace
    )


def _clip_by_value(
    dev: Device,
    xp: Any,
    leaves: list[Any],
    names: Sequence[str],
    *,
    lo: Any,
    hi: Any,
    nonfinite: str,
    inplace: bool,
) -> list[Any]:
    """Clamp every entry to ``[lo, hi]``: one launch (two for "raise" and "skip")."""
    if not all(b is None or isinstance(b, int | float) for b in (lo, hi)):
        # The clamp kernel takes its bounds by value; an array bound would
        # need a sync to read, so the generic path clamps against it on the device.
        return _core.clip_by_value(
            xp, leaves, names, lo=lo, hi=hi, nonfinite=nonfinite, inplace=inplace
        )
    lay = _launch.layout(dev, leaves)
    finite = None
    if nonfinite in ("raise", "skip"):  # the finite flags come with an inf-norm pass
        _, out = _reduce(dev, leaves, names, p=math.inf, nonfinite=nonfinite, lay=lay)
        finite = out.finite(dev) if nonfinite == "skip" else None
    buf, new = (None, list(leaves)) if inplace else _new_leaves(dev, lay, leaves)
    bf16 = next((d for d in {x.dtype for x in leaves} if d.name == "bfloat16"), None)
    _launch.clamp(
        dev, lay, lo=lo, hi=hi, zero=nonfinite == "zero", finite=finite, dst=buf, bf16=bf16
    )
    return new


global_norm = _entry(_core.global_norm, _global_norm)
leaf_norms = _entry(_core.leaf_norms, _leaf_norms)
clip_by_global_norm = _entry(_core.clip_by_global_norm, functools.partial(_clip, mode="global"))
clip_by_norm = _entry(_core.clip_by_norm, functools.partial(_clip, mode="leaf"))
clip_by_block_rms = _entry(_core.clip_by_block_rms, _clip_by_block_rms)
clip_by_value = _entry(_core.clip_by_value, _clip_by_value)
# The generic reduction per example and cuBLAS's matmul for the sum: no kernel of ours.
per_example_clip = _core.per_example_clip
