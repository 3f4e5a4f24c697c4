"""The CuPy raw-kernel path on a CUDA device (issue 5).

Every case runs ``fused=True`` (the kernels) against ``fused=False`` (the
generic array-API path, the reference) and against float64 references: NumPy
on the host from ``cupy.asnumpy`` copies, or, for the 2**28-element leaves,
CuPy reductions in float64 chunks on the device. Without CuPy or a CUDA device
the module skips with the reason. Run it with ``nox -s gpu``, or where nox is
not installed::

    PYTHONPATH=src python -m pytest tests/test_cupy_gpu.py

``-m "not slow"`` leaves out the 2**28-element leaves, the 5000-leaf trees and
the 100-run determinism checks.

How results are compared, and why that is fair:

* Norms. ``ord=inf``, ``-inf`` and ``0`` of real leaves are a max, a min and a
  count, all exact, so fused, generic and float64 results agree bit for bit.
  Every other norm is a rounded sum whose order differs between the paths (and
  ``|z|`` of a complex entry is rounded too): ``rtol=1e-6``, the issue's bound.
* Norm-clipped leaves. DESIGN.md multiplies every leaf by the scale in the
  leaf's own dtype, and float16/bfloat16 leaves as torch's ``mul_`` does
  (its float32 ``opmath``; the generic path's ``Plan.factor_dtype``): by the
  scale in float32, the float32 product rounded to the leaf's dtype. So each
  output must equal, bit for bit, ``x * c`` computed on the host that way,
  where ``c`` is the call's own ``stats.scale`` rounded to the leaf's (real)
  dtype, float32 for float16/bfloat16. Either neighbour of a float64 scale is
  accepted as ``c`` (a conversion may round either way, and neither is
  wrong). Given ``c`` there is no slack, not even for float16/bfloat16
  (rounding the scale to float16 first, as an earlier version of this check
  did, is up to half an ulp of float16 off, and 1 ulp off in many outputs):
  fused and generic outputs may differ only through their scales, which must
  agree to ``rtol=1e-6``. A 1e-6 change of the scale can move it to the next
  float32 value, which may move a float16 output by an ulp; that is the only
  ulp difference allowed, and only with a scale that differs. Where both
  scales are bit-identical, the two outputs must be identical.
* ``clip_by_block_rms`` returns no scale, so its outputs are held to what the
  contract implies: ``x * scale`` (float64 reference) within 1e-6 relative
  plus 3 ulps of the leaf's dtype (half an ulp for the product, under 2 for
  rounding the scale to the dtype).
* ``clip_by_value`` is exact: fused, generic and the host reference agree bit
  for bit.
* "Identical" means equal values: NaN equals NaN and -0 equals +0, because
  the generic path multiplies a complex leaf by a complex scale,
  ``(a+bi)(s+0i)``, whose zero signs and NaN parts can differ from
  ``a*s + (b*s)i``. Inputs that must not change are compared byte for byte.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import optree
import pytest

import gradclip as gc
from conftest import _cupy_device_reason, importorskip, np_dtype, ref_norm

cp = importorskip("cupy")
if (_reason := _cupy_device_reason()) is not None:
    pytest.skip(_reason, allow_module_level=True)
importorskip("ml_dtypes")  # bfloat16 leaves are ml_dtypes arrays moved to the device

REAL = ("float16", "bfloat16", "float32", "float64")
NARROW = ("float16", "bfloat16")  # multiplied in float32 (see the module docstring)
COMPLEX = ("complex64", "complex128")
DTYPES = REAL + COMPLEX
ORDS = (2.0, 1.0, 3.5, math.inf, -math.inf, 0.0)
EXACT_ORDS = (math.inf, -math.inf, 0.0)
SIZES = (1, 2, 31, 1000, 65535, 65536, 65537, 2**20 + 3)
NONFINITE = ("propagate", "raise", "zero", "skip")
RTOL = 1e-6
NORM_CLIPS = ("clip_by_global_norm", "clip_by_global_norm_", "clip_by_norm", "clip_by_norm_")
VALUE_CLIPS = ("clip_by_value", "clip_by_value_")
CLIPS = (*NORM_CLIPS, *VALUE_CLIPS, "clip_by_block_rms")
FNS = ("norms", *CLIPS)  # "norms": global_norm and leaf_norms
MAX_NORM = 0.37  # clips most trees here, not all of their leaves (clip_by_norm)
CLIP_VALUE = 0.5
# The result dtype rule: float32 norms, float64 when a float64/complex128 leaf is present.
MIXES = {"float32": ("float16", "bfloat16", "float32", "complex64"), "float64": DTYPES}
_REAL_OF = {"complex64": "float32", "complex128": "float64"}
# (mantissa bits, exponent of the smallest normal) of each real dtype, for ulps.
_FORMAT = {
    "float16": (10, -14),
    "bfloat16": (7, -126),
    "float32": (23, -126),
    "float64": (52, -1022),
}
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _pairs(dtypes: tuple[str, ...], fns: tuple[str, ...]) -> list[Any]:
    """(dtype, fn) parameters, leaving out complex leaves for clip_by_value (they raise)."""
    return [
        pytest.param(d, fn, id=f"{d}-{fn}")
        for d in dtypes
        for fn in fns
        if not (fn in VALUE_CLIPS and d in COMPLEX)
    ]


# ------------------------------------------------------------------------ small helpers


def _name(dtype: Any) -> str:
    return np.dtype(dtype).name


def _real_name(dtype: Any) -> str:
    return _REAL_OF.get(_name(dtype), _name(dtype))


def _factor_name(dtype: Any) -> str:
    """The dtype a leaf is multiplied in: its real dtype, float32 for float16/bfloat16."""
    real = _real_name(dtype)
    return "float32" if real in NARROW else real


def _key(i: int) -> str:
    return f"l{i:04d}"


def _path(i: int) -> str:
    """How gradclip names leaf ``i`` of the dict trees built here."""
    return f"['{_key(i)}']"


def _leaves(tree: Any) -> list[Any]:
    """Leaves in gradclip's flattening order (optree's; None skipped)."""
    if isinstance(tree, gc.FlatTree):
        tree = tree.tree
    return optree.tree_leaves(tree)


def _host(x: Any) -> np.ndarray:
    return cp.asnumpy(x)


def _wide(h: Any) -> np.ndarray:
    """float64 (complex128) copy: exact for every dtype here."""
    h = np.asarray(h)
    return h.astype(np.complex128 if np.iscomplexobj(h) else np.float64)


def _device_id(x: Any) -> int:
    return int(x.device.id)


def _res_dtype(leaves: list[Any]) -> np.dtype:
    wide = any(_name(x.dtype) in ("float64", "complex128") for x in leaves)
    return np.dtype(np.float64 if wide else np.float32)


def _is_real(leaves: list[Any]) -> bool:
    return not any(_name(x.dtype) in COMPLEX for x in leaves)


def _values(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    h = rng.standard_normal(shape)
    if dtype in COMPLEX:
        h = h + 1j * rng.standard_normal(shape)
    return np.asarray(h).astype(np_dtype(dtype))


# --------------------------------------------------------------------------- trees
#
# A "build" is a function returning a fresh tree of new device arrays holding
# the same values on every call: one for the fused run, one for the generic
# run, so that in-place calls never see each other's writes.

Build = Callable[[], Any]


def _tree(specs: list[tuple[str, Any]], *, seed: int = 0, bad: Any = None) -> Build:
    """Dict trees of random leaves from ``(dtype, shape or size)`` specs.

    ``bad=(i, value)`` writes ``value`` (NaN or an infinity) into the middle of leaf ``i``.
    """
    shapes = [(d, (s,) if isinstance(s, int) else tuple(s)) for d, s in specs]

    def build() -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        tree = {}
        for i, (dtype, shape) in enumerate(shapes):
            h = _values(rng, shape, dtype)
            if bad is not None and bad[0] == i:
                h.reshape(-1)[h.size // 2] = bad[1]
            tree[_key(i)] = cp.asarray(h)
        return tree

    return build


def _many(n: int, mix: str, *, real: bool = False, seed: int = 0) -> Build:
    """``n`` leaves cycling through the dtypes of ``mix``, of random sizes.

    Mostly 1 to 4000 entries, some 2-d, and among every 50 leaves one of
    65537 entries, one 0-d and one empty.
    """
    rng = np.random.default_rng(seed + n)
    dtypes = [d for d in MIXES[mix] if not (real and d in COMPLEX)]
    specs: list[tuple[str, Any]] = []
    for i, size in enumerate(rng.integers(1, 4000, n).tolist()):
        shape: tuple[int, ...] = (size,)
        if i % 50 == 3:
            shape = (65537,)
        elif i % 50 == 11:
            shape = ()
        elif i % 50 == 17:
            shape = (0,)
        elif i % 7 == 5:
            shape = (size // 8 + 1, 8)
        specs.append((dtypes[i % len(dtypes)], shape))
    return _tree(specs, seed=seed)


def _real_only(specs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [s for s in specs if s[0] not in COMPLEX]


# ----------------------------------------------------------------------- comparisons


def _assert_norms(got: Any, want: Any, *, exact: bool, what: str) -> None:
    got = _host(got) if isinstance(got, cp.ndarray) else got
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if exact:
        np.testing.assert_array_equal(got, want, err_msg=what)
    else:
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=0, err_msg=what)


def _assert_values(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Equal values: NaN equals NaN, -0 equals +0 (see the module docstring)."""
    got, want = _wide(got), _wide(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    if np.array_equal(got, want, equal_nan=True):
        return
    differ = ~((got == want) | (np.isnan(got) & np.isnan(want)))
    first = tuple(np.argwhere(differ)[0])
    pytest.fail(
        f"{what}: {int(differ.sum())} of {differ.size} entries differ; "
        f"first at {first}: got {got[first]!r}, expected {want[first]!r}"
    )


def _assert_unchanged(leaves: list[Any], before: list[np.ndarray], what: str) -> None:
    for i, (x, h) in enumerate(zip(leaves, before, strict=True)):
        assert _host(x).tobytes() == h.tobytes(), f"{what}: leaf {i} was modified"


def _check_array(a: Any, dtype: Any, shape: tuple[int, ...], device: int, what: str) -> None:
    assert isinstance(a, cp.ndarray), f"{what} is a {type(a).__name__}, not a cupy.ndarray"
    assert a.dtype == dtype, f"{what} has dtype {a.dtype}, expected {np.dtype(dtype)}"
    assert a.shape == shape, f"{what} has shape {a.shape}, expected {shape}"
    assert _device_id(a) == device, f"{what} is on device {_device_id(a)}, not {device}"


def _check_stats(stats: Any, leaves: list[Any], shape: tuple[int, ...]) -> None:
    """ClipStats of CuPy arrays on the leaves' device, with the result dtype rule."""
    assert isinstance(stats, gc.ClipStats)
    res, device = _res_dtype(leaves), _device_id(leaves[0])
    for name in ("norm", "scale"):
        _check_array(getattr(stats, name), res, shape, device, f"stats.{name}")
    for name in ("clipped", "finite"):
        _check_array(getattr(stats, name), np.bool_, shape, device, f"stats.{name}")


def _check_outputs(outs: list[Any], leaves: list[Any], what: str) -> None:
    """New arrays of the inputs' dtype, shape and device, sharing no memory with them."""
    assert len(outs) == len(leaves), f"{what}: {len(outs)} leaves for {len(leaves)}"
    for i, (o, x) in enumerate(zip(outs, leaves, strict=True)):
        _check_array(o, x.dtype, x.shape, _device_id(x), f"{what} leaf {i}")
        assert not cp.may_share_memory(o, x), f"{what} leaf {i} shares memory with its input"


def _neighbours(s: float, real: str) -> list[float]:
    """The ``real``-dtype values next to ``s >= 0``: ``s`` itself if it is one, else both sides."""
    c = np.array([s], np.float64).astype(np_dtype(real))
    near = float(c[0])
    if not math.isfinite(s) or near == s:
        return [near]
    assert s > 0, s
    bits = c.view(_UINT[c.itemsize])
    other = (bits + 1 if near < s else bits - 1).view(c.dtype)
    return [near, float(other[0])]


def _times(x: np.ndarray, c: float, *, zero: bool) -> np.ndarray:
    """``x * c`` in x's own dtype: one rounding (the product is exact in float64 first),
    or for float16/bfloat16 the float32 product rounded to x's dtype (torch's ``mul_``).
    """
    with np.errstate(all="ignore"):
        if np.iscomplexobj(x):
            out = np.empty_like(x)
            out.real = _times(x.real, c, zero=False)
            out.imag = _times(x.imag, c, zero=False)
        elif _name(x.dtype) in NARROW:
            out = np.asarray(x.astype(np.float32) * np.float32(c)).astype(x.dtype)
        else:  # np.asarray: a 0-d product is a NumPy scalar
            out = np.asarray(x.astype(np.float64) * c).astype(x.dtype)
        if zero:
            out[~np.isfinite(_wide(x))] = 0
    return out


def _assert_scaled(got: np.ndarray, x: np.ndarray, scale: float, *, zero: bool, what: str) -> None:
    """``got == x * c`` bit for bit, ``c`` being ``scale`` in x's factor dtype (either side)."""
    assert got.dtype == x.dtype and got.shape == x.shape, what
    candidates = _neighbours(scale, _factor_name(x.dtype))
    if any(_equal(got, _times(x, c, zero=zero)) for c in candidates):
        return
    _assert_values(got, _times(x, candidates[0], zero=zero), f"{what}: x * {candidates}")


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(_wide(a), _wide(b), equal_nan=True))


def _ulp(y: np.ndarray, real: str) -> np.ndarray:
    """The spacing of dtype ``real`` at ``|y|`` (float64 ``y``; subnormal spacing at 0)."""
    bits, emin = _FORMAT[real]
    with np.errstate(all="ignore"):
        e = np.floor(np.log2(np.abs(y)))
    e = np.where(np.isfinite(e), np.maximum(e, emin), emin)
    return np.exp2(e - bits)


def _assert_near(got: np.ndarray, want: np.ndarray, real: str, what: str) -> None:
    """``got`` within 1e-6 relative plus 3 ulps of dtype ``real`` of the float64 ``want``."""
    got, want = _wide(got), _wide(want)
    parts = (
        [(got.real, want.real), (got.imag, want.imag)] if np.iscomplexobj(want) else [(got, want)]
    )
    for g, w in parts:
        special = ~np.isfinite(w)
        _assert_values(g[special], w[special], f"{what} (NaN/inf entries)")
        g, w = g[~special], w[~special]
        err = np.abs(g - w)
        tol = RTOL * np.abs(w) + 3 * _ulp(w, real)
        if not (err <= tol).all():
            i = int(np.argmax(err - tol))
            pytest.fail(f"{what}: got {g[i]!r}, expected {w[i]!r} within {tol[i]:.3g}")


# ----------------------------------------------------------------------- references


def _zeroed(w: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(w), w, 0)


def _ref_leaf_norm(w: np.ndarray, p: float) -> float:
    """One leaf's norm; for ord=0 its count of nonzero entries."""
    with np.errstate(all="ignore"):
        return float(np.count_nonzero(w)) if p == 0 else ref_norm([w], p)


def _ref_global_norm(wide: list[np.ndarray], p: float) -> float:
    """torch's get_total_norm: for ord=0 the number of leaves holding a nonzero."""
    with np.errstate(all="ignore"):
        return ref_norm(wide, p)


def _ref_scale(norm: float, max_norm: float, eps: float) -> float:
    """``min(1, max_norm / (norm + eps))``, NaN for a NaN norm (the generic path's arithmetic)."""
    denom = norm + eps
    if math.isnan(denom):
        return math.nan
    return max_norm / denom if denom > max_norm else 1.0


# -------------------------------------------------------------------- the checks
#
# Each runs one function fused and generic on fresh trees, checks both against
# the references above and each other, and returns the tree the fused call saw
# (clipped in place for the in-place forms).


def _expect_raise(call: Callable[[bool, Any], Any], build: Build, bad: Any, what: str) -> Any:
    """Both paths raise NonFiniteError naming leaf ``bad[0]`` and modify nothing."""
    tree = None
    for fused in (True, False):
        tree = build()
        leaves = _leaves(tree)
        before = [_host(x) for x in leaves]
        with pytest.raises(gc.NonFiniteError, match=re.escape(_path(bad[0]))):
            call(fused, tree)
        _assert_unchanged(leaves, before, f"{what} (fused={fused}) after NonFiniteError")
    return tree


def check_norms(
    build: Build,
    ord: float = 2.0,
    *,
    nonfinite: str = "propagate",
    bad: Any = None,
    generic: bool = True,
):
    """global_norm and leaf_norms; ``generic=False``: not compared with the generic path."""

    def call(fn: str) -> Callable[[bool, Any], Any]:
        return lambda fused, tree: getattr(gc, fn)(tree, ord=ord, nonfinite=nonfinite, fused=fused)

    if nonfinite == "raise" and bad is not None:
        _expect_raise(call("leaf_norms"), build, bad, "leaf_norms")
        return _expect_raise(call("global_norm"), build, bad, "global_norm")
    tree = build()
    leaves = _leaves(tree)
    before = [_host(x) for x in leaves]
    wide = [_wide(h) for h in before]
    if nonfinite == "zero":
        wide = [_zeroed(w) for w in wide]
    exact = ord in EXACT_ORDS and _is_real(leaves)
    want = {
        "global_norm": (_ref_global_norm(wide, ord), ()),
        "leaf_norms": ([_ref_leaf_norm(w, ord) for w in wide], (len(leaves),)),
    }
    for fn, (ref, shape) in want.items():
        fused, generic_out = call(fn)(True, tree), call(fn)(False, tree)
        what = f"{fn}(ord={ord}, nonfinite={nonfinite!r})"
        _check_array(fused, _res_dtype(leaves), shape, _device_id(leaves[0]), what)
        _assert_norms(fused, ref, exact=exact, what=f"{what}: fused vs float64")
        if generic:
            _assert_norms(fused, _host(generic_out), exact=exact, what=f"{what}: fused vs generic")
    _assert_unchanged(leaves, before, "global_norm/leaf_norms")
    return tree


def check_clip(
    build: Build,
    fn: str,
    max_norm: float = MAX_NORM,
    *,
    ord: float = 2.0,
    eps: float = 1e-6,
    nonfinite: str = "propagate",
    bad: Any = None,
    generic: bool = True,
):
    """clip_by_global_norm(_) and clip_by_norm(_): stats, outputs, inputs.

    ``generic=False``: the generic path runs but is not compared with.
    """
    inplace, per_leaf = fn.endswith("_"), fn.startswith("clip_by_norm")

    def call(fused: bool, tree: Any) -> Any:
        return getattr(gc, fn)(tree, max_norm, ord=ord, eps=eps, nonfinite=nonfinite, fused=fused)

    if nonfinite == "raise" and bad is not None:
        return _expect_raise(call, build, bad, fn)
    runs = {}
    for fused in (True, False):
        tree = build()
        leaves = _leaves(tree)
        before = [_host(x) for x in leaves]
        what = f"{fn}(fused={fused}, ord={ord}, nonfinite={nonfinite!r})"
        if inplace:
            stats, outs = call(fused, tree), leaves  # the same arrays, clipped
        else:
            new, stats = call(fused, tree)
            outs = _leaves(new)
            _check_outputs(outs, leaves, what)
            _assert_unchanged(leaves, before, what)
        _check_stats(stats, leaves, (len(leaves),) if per_leaf else ())
        stats = gc.ClipStats(*(_host(a) for a in stats))
        runs[fused] = (tree, [_host(o) for o in outs], stats, before)

    tree, outs, stats, before = runs[True]
    _, generic_outs, generic_stats, _ = runs[not generic]
    wide = [_wide(h) for h in before]
    finite = [bool(np.isfinite(w).all()) for w in wide]
    if nonfinite == "zero":
        wide = [_zeroed(w) for w in wide]
    if per_leaf:
        norms = [_ref_leaf_norm(w, ord) for w in wide]
    else:
        norms, finite = [_ref_global_norm(wide, ord)], [all(finite)]
    scales = [_ref_scale(n, max_norm, eps) for n in norms]
    if nonfinite == "skip":
        scales = [s if f else 1.0 for s, f in zip(scales, finite, strict=True)]
    shape = stats.norm.shape
    exact = ord in EXACT_ORDS and _is_real(_leaves(tree))
    what = f"{fn}(ord={ord}, nonfinite={nonfinite!r}) stats"
    _assert_norms(stats.norm, np.reshape(norms, shape), exact=exact, what=f"{what}.norm vs float64")
    _assert_norms(stats.norm, generic_stats.norm, exact=exact, what=f"{what}.norm vs generic")
    for ref, label in ((np.reshape(scales, shape), "float64"), (generic_stats.scale, "generic")):
        np.testing.assert_allclose(
            stats.scale, ref, rtol=RTOL, atol=0, err_msg=f"{what}.scale vs {label}"
        )
    for name, ref in (("clipped", [s < 1 for s in scales]), ("finite", finite)):
        np.testing.assert_array_equal(getattr(stats, name), np.reshape(ref, shape), what + name)
        got, ref = getattr(stats, name), getattr(generic_stats, name)
        np.testing.assert_array_equal(got, ref, what + name)

    zero = nonfinite == "zero"
    for i, (o, g, x) in enumerate(zip(outs, generic_outs, before, strict=True)):
        j = i if per_leaf else ()
        label = f"{fn}(ord={ord}, nonfinite={nonfinite!r}) leaf {i} ({x.dtype})"
        _assert_scaled(o, x, float(stats.scale[j]), zero=zero, what=label)
        # Compared with the generic leaf only where the paths' arithmetic is the
        # same: bit-identical scales, and no complex leaf holding an infinity
        # (see the module docstring).
        same_scale = stats.scale[j].tobytes() == generic_stats.scale[j].tobytes()
        plain = not np.iscomplexobj(x) or bool(np.isfinite(_wide(x)).all())
        if same_scale and plain:
            _assert_values(o, g, f"{label}: fused vs generic")
    return tree


def check_value(
    build: Build,
    fn: str,
    bounds: dict[str, float] | None = None,
    *,
    nonfinite: str = "propagate",
    bad: Any = None,
):
    """clip_by_value(_): bit for bit against the generic path and the host."""
    bounds = {"clip_value": CLIP_VALUE} if bounds is None else bounds
    inplace = fn.endswith("_")

    def call(fused: bool, tree: Any) -> Any:
        return getattr(gc, fn)(tree, **bounds, nonfinite=nonfinite, fused=fused)

    if nonfinite == "raise" and bad is not None:
        return _expect_raise(call, build, bad, fn)
    results = {}
    for fused in (True, False):
        tree = build()
        leaves = _leaves(tree)
        before = [_host(x) for x in leaves]
        what = f"{fn}({bounds}, fused={fused}, nonfinite={nonfinite!r})"
        if inplace:
            assert call(fused, tree) is None
            outs = leaves
        else:
            outs = _leaves(call(fused, tree))
            _check_outputs(outs, leaves, what)
            _assert_unchanged(leaves, before, what)
        results[fused] = (tree, [_host(o) for o in outs], before)

    tree, outs, before = results[True]
    lo, hi = bounds.get("lo"), bounds.get("hi")
    if "clip_value" in bounds:
        lo, hi = -bounds["clip_value"], bounds["clip_value"]
    keep = nonfinite == "skip" and not all(np.isfinite(_wide(x)).all() for x in before)
    for i, (o, g, x) in enumerate(zip(outs, results[False][1], before, strict=True)):
        want = _wide(x)
        if nonfinite == "zero":
            want = _zeroed(want)
        # The bounds in the leaf's dtype, as the generic path rounds them.
        if lo is not None:
            want = np.maximum(want, float(np.array(lo).astype(x.dtype)))
        if hi is not None:
            want = np.minimum(want, float(np.array(hi).astype(x.dtype)))
        if keep:
            want = _wide(x)
        label = f"{fn}({bounds}, nonfinite={nonfinite!r}) leaf {i} ({x.dtype})"
        _assert_values(o, want, f"{label}: fused vs float64")
        _assert_values(o, g, f"{label}: fused vs generic")
    return tree


def check_block_rms(
    build: Build, threshold: float = MAX_NORM, *, nonfinite: str = "propagate", bad: Any = None
):
    """clip_by_block_rms: both paths within the contract's bound of the float64 result."""

    def call(fused: bool, tree: Any) -> Any:
        return gc.clip_by_block_rms(tree, threshold, nonfinite=nonfinite, fused=fused)

    if nonfinite == "raise" and bad is not None:
        return _expect_raise(call, build, bad, "clip_by_block_rms")
    trees = {}
    for fused in (True, False):
        tree = build()
        leaves = _leaves(tree)
        before = [_host(x) for x in leaves]
        what = f"clip_by_block_rms(fused={fused}, nonfinite={nonfinite!r})"
        outs = _leaves(call(fused, tree))
        _check_outputs(outs, leaves, what)
        _assert_unchanged(leaves, before, what)
        trees[fused] = tree
        with np.errstate(all="ignore"):
            for i, (o, x) in enumerate(zip(outs, before, strict=True)):
                w = _wide(x)
                finite = bool(np.isfinite(w).all())
                if nonfinite == "zero":
                    w = _zeroed(w)
                rms = ref_norm([w], 2.0) / math.sqrt(max(w.size, 1))
                scale = 1.0 / np.maximum(1.0, rms / threshold)  # NaN stays NaN
                if nonfinite == "skip" and not finite:
                    scale = 1.0
                want = np.asarray(w * scale)
                if nonfinite == "zero":
                    want[~np.isfinite(_wide(x))] = 0
                _assert_near(_host(o), want, _real_name(x.dtype), f"{what} leaf {i} ({x.dtype})")
    return trees[True]


def check(fn: str, build: Build, *, ord: float = 2.0, nonfinite: str = "propagate", bad=None):
    """Run the check for ``fn`` (one of FNS)."""
    if fn == "norms":
        return check_norms(build, ord, nonfinite=nonfinite, bad=bad)
    if fn in NORM_CLIPS:
        return check_clip(build, fn, ord=ord, nonfinite=nonfinite, bad=bad)
    if fn in VALUE_CLIPS:
        return check_value(build, fn, nonfinite=nonfinite, bad=bad)
    return check_block_rms(build, nonfinite=nonfinite, bad=bad)


# ============================================================================ the tests


def test_fused_true_runs_the_cupy_kernel_path():
    """fused=True raises "no fast path for cupy arrays" until the kernels are registered."""
    x = cp.asarray(np.array([3.0, 4.0], np.float32))
    assert float(gc.global_norm([x], fused=True)) == 5.0


def test_default_is_the_fused_path():
    build = _many(7, "float64")
    tree = build()
    for p in ORDS:
        default, fused = gc.global_norm(tree, ord=p), gc.global_norm(tree, ord=p, fused=True)
        assert _host(default).tobytes() == _host(fused).tobytes(), p
    assert _outcome(gc.clip_by_global_norm(tree, MAX_NORM)) == _outcome(
        gc.clip_by_global_norm(tree, MAX_NORM, fused=True)
    )


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_every_dtype_and_size(dtype, size, ord):
    check_norms(_tree([(dtype, size)], seed=size), ord)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("dtype", "fn"), _pairs(DTYPES, CLIPS))
def test_clipping_every_dtype_and_size(dtype, fn, size):
    check(fn, _tree([(dtype, size)], seed=size))


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("fn", NORM_CLIPS)
@pytest.mark.parametrize("ord", ORDS)
def test_clipping_every_ord(ord, fn, mix):
    check_clip(_many(7, mix), fn, ord=ord)


LEAF_COUNTS = [1, 7, 300, pytest.param(5000, marks=pytest.mark.slow)]


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("n", LEAF_COUNTS)
def test_norms_of_many_leaves(n, ord, mix):
    check_norms(_many(n, mix), ord)


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("fn", CLIPS)
@pytest.mark.parametrize("n", LEAF_COUNTS)
def test_clipping_many_leaves(n, fn, mix):
    check(fn, _many(n, mix, real=fn in VALUE_CLIPS))


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("fn", NORM_CLIPS)
def test_nothing_to_clip(fn, mix):
    """scale == 1 (the kernels may skip the write): every leaf keeps its bytes."""
    build = _many(300, mix)
    tree = check_clip(build, fn, 1e9)
    if fn.endswith("_"):
        _assert_unchanged(_leaves(tree), [_host(x) for x in _leaves(build())], fn)


@pytest.mark.parametrize(
    "bounds",
    [{"clip_value": CLIP_VALUE}, {"lo": -0.3}, {"hi": 0.2}, {"lo": -0.1, "hi": 0.7}],
    ids=["clip_value", "lo", "hi", "lo-hi"],
)
@pytest.mark.parametrize("fn", VALUE_CLIPS)
@pytest.mark.parametrize("tree", ["float16", "bfloat16", "float32", "float64", "mixed"])
def test_clip_by_value_bounds(tree, fn, bounds):
    if tree == "mixed":
        build = _many(300, "float64", real=True)
    else:
        build = _tree([(tree, s) for s in (1, 31, 65537, (300, 70), ())], seed=4)
    check_value(build, fn, bounds)


# ------------------------------------------------------------------- views and strides

# (offset, shape) of leaves sliced out of one buffer: adjacent ones, one-entry
# gaps, a 2-d view and a 0-d one, all at odd element offsets.
SLICES = [(3, (1000,)), (1003, (7,)), (1010, (1,)), (1012, (3, 4099)), (13310, (65537,))]
SLICES += [(78849, ())]
SLICED_SIZE = 78860


def _slices(dtype: str, seed: int = 0) -> tuple[Build, list[np.ndarray]]:
    """Leaves that are views ``buf[3:1003]``, ``buf[1003:1010]``, ... of one buffer.

    Returns the build and, per leaf, the mask of its buffer's entries held by
    any leaf (what the calls may write).
    """

    def build() -> dict[str, Any]:
        buf = cp.asarray(_values(np.random.default_rng(seed), (SLICED_SIZE,), dtype))
        return {
            _key(i): buf[a : a + math.prod(shape)].reshape(shape)
            for i, (a, shape) in enumerate(SLICES)
        }

    mask = np.zeros(SLICED_SIZE, bool)
    for a, shape in SLICES:
        mask[a : a + math.prod(shape)] = True
    return build, [mask] * len(SLICES)


CARVED = [
    ("float16", (1000,)),
    ("bfloat16", (7,)),
    ("float32", (1,)),
    ("float64", (65537,)),
    ("complex64", (31,)),
    ("complex128", (3, 5)),
    ("float16", (65535,)),
    ("bfloat16", (2, 500)),
    ("float32", ()),
    ("float64", (0,)),
    ("float32", (4099,)),
    ("complex64", (1000,)),
]


def _carved(specs: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> tuple[Build, list]:
    """Leaves of mixed dtypes carved out of one byte buffer, with gaps of random bytes.

    Each leaf starts at an odd multiple of its item size: aligned for its
    dtype, but (below 16-byte items) not to 16 bytes, so vector loads and
    stores must handle a ragged head and tail without touching the gaps.
    """
    layout, cursor = [], 0
    for dtype, shape in specs:
        item = np.dtype(np_dtype(dtype)).itemsize
        start = (cursor // item + 1) * item
        start += item * (1 - (start // item) % 2)
        layout.append((dtype, shape, start, item * math.prod(shape)))
        cursor = start + item * math.prod(shape)
    size = cursor + 64

    def build() -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        raw = cp.asarray(rng.integers(0, 256, size, dtype=np.uint8))
        tree = {}
        for i, (dtype, shape, start, nbytes) in enumerate(layout):
            leaf = raw[start : start + nbytes].view(np_dtype(dtype)).reshape(shape)
            leaf[...] = cp.asarray(_values(rng, shape, dtype))
            tree[_key(i)] = leaf
        return tree

    mask = np.zeros(size, bool)
    for _, _, start, nbytes in layout:
        mask[start : start + nbytes] = True
    return build, [mask] * len(layout)


# (root shape, view) of non-contiguous leaves: "T" transposes.
STRIDED = [
    ((2000,), (slice(None, None, 2),)),
    ((300, 70), "T"),
    ((64, 90), (slice(None), slice(1, None, 3))),
    ((4099,), (slice(None, None, -1),)),
    ((7, 9, 11), (slice(None), slice(None, None, 2), slice(1, None))),
    ((2 * 65537,), (slice(1, None, 2),)),
    ((5, 1000), (slice(None), slice(3, 1003 - 3))),  # rows of a wider matrix
]


def _take(a: Any, index: Any) -> Any:
    return a.T if index == "T" else a[index]


def _strided(dtype: str, seed: int = 0) -> tuple[Build, list[np.ndarray]]:
    """Non-contiguous views (every other entry, transposes, column slices, reversed)."""

    def build() -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        return {
            _key(i): _take(cp.asarray(_values(rng, shape, dtype)), index)
            for i, (shape, index) in enumerate(STRIDED)
        }

    masks = []
    for shape, index in STRIDED:
        mask = np.zeros(shape, bool)
        _take(mask, index)[...] = True
        masks.append(mask)
    return build, masks


def _assert_outside_untouched(tree: Any, build: Build, masks: list[np.ndarray]) -> None:
    """The entries of each leaf's buffer outside every leaf are as ``build`` makes them."""
    for i, (x, y, mask) in enumerate(zip(_leaves(tree), _leaves(build()), masks, strict=True)):
        assert x.base is not None and y.base is not None, f"leaf {i} is not a view"
        outside = ~mask.reshape(-1)
        got, want = _host(x.base).reshape(-1), _host(y.base).reshape(-1)
        assert got[outside].tobytes() == want[outside].tobytes(), (
            f"leaf {i}: memory next to the leaf was written"
        )


@pytest.mark.parametrize(("dtype", "fn"), _pairs(DTYPES, FNS))
def test_slices_of_one_buffer(dtype, fn):
    build, masks = _slices(dtype)
    for p in ORDS if fn == "norms" else (2.0,):
        tree = check(fn, build, ord=p)
    _assert_outside_untouched(tree, build, masks)


@pytest.mark.parametrize("fn", FNS)
def test_mixed_dtypes_carved_from_one_byte_buffer(fn):
    build, masks = _carved(_real_only(CARVED) if fn in VALUE_CLIPS else CARVED)
    for p in ORDS if fn == "norms" else (2.0,):
        tree = check(fn, build, ord=p)
    _assert_outside_untouched(tree, build, masks)


@pytest.mark.parametrize(("dtype", "fn"), _pairs(DTYPES, FNS))
def test_noncontiguous_leaves(dtype, fn):
    """Handled by the kernels or routed to the generic path: identical results either way."""
    build, masks = _strided(dtype)
    for p in ORDS if fn == "norms" else (2.0,):
        tree = check(fn, build, ord=p)
    _assert_outside_untouched(tree, build, masks)


# ------------------------------------------------------------------------- non-finite

NONFINITE_SPECS = {
    "float32": [
        ("float32", (257, 255)),
        ("float16", 1000),
        ("bfloat16", 31),
        ("float32", 1),
        ("complex64", 65537),
        ("float32", ()),
    ],
    "float64": [
        ("float32", (257, 255)),
        ("float16", 1000),
        ("bfloat16", 31),
        ("float64", 1),
        ("complex128", 65537),
        ("float32", ()),
    ],
}
# NaN and infinities go into real leaves: the generic path turns an infinite
# complex entry times a real scale into inf+nanj, so there the paths differ by
# design (the fused result is checked against the contract in
# test_nonfinite_complex_leaf).
PLACES = [None] + [(i, v) for i in (0, 2, 3) for v in (math.nan, math.inf, -math.inf)]
PLACE_IDS = ["finite"] + [f"{v}-in-leaf{i}" for i in (0, 2, 3) for v in ("nan", "inf", "-inf")]
POLICIES = [(fn, nf) for fn in FNS for nf in NONFINITE if not (fn == "norms" and nf == "skip")]


@pytest.mark.parametrize("mix", list(NONFINITE_SPECS))
@pytest.mark.parametrize("bad", PLACES, ids=PLACE_IDS)
@pytest.mark.parametrize(("fn", "nonfinite"), POLICIES)
def test_nonfinite(fn, nonfinite, bad, mix):
    specs = NONFINITE_SPECS[mix]
    build = _tree(_real_only(specs) if fn in VALUE_CLIPS else specs, seed=3, bad=bad)
    check(fn, build, nonfinite=nonfinite, bad=bad)


EVERY_ORD_POLICIES = [(fn, nf) for fn, nf in POLICIES if fn in ("norms", "clip_by_global_norm_")]
EVERY_ORD_POLICIES += [("clip_by_norm", nf) for nf in NONFINITE]


@pytest.mark.parametrize("bad", PLACES[1:7], ids=PLACE_IDS[1:7])
@pytest.mark.parametrize(("fn", "nonfinite"), EVERY_ORD_POLICIES)
@pytest.mark.parametrize("ord", ORDS)
def test_nonfinite_every_ord(ord, fn, nonfinite, bad):
    build = _tree(NONFINITE_SPECS["float32"], seed=5, bad=bad)
    check(fn, build, ord=ord, nonfinite=nonfinite, bad=bad)


@pytest.mark.parametrize("nonfinite", ["propagate", "zero", "skip"])
@pytest.mark.parametrize("fn", ["clip_by_global_norm", "clip_by_global_norm_", "clip_by_norm_"])
@pytest.mark.parametrize("dtype", COMPLEX)
def test_nonfinite_complex_leaf(dtype, fn, nonfinite):
    """Infinite complex entries: the fused results against the contract (see PLACES)."""
    tree = _tree([(dtype, 1000), ("float32", 7)], seed=6)()
    z = tree[_key(0)]
    z[500] = complex(math.inf, 1.0)
    z[501] = complex(2.0, -math.inf)
    before = [_host(x) for x in _leaves(tree)]
    inplace, per_leaf = fn.endswith("_"), fn.startswith("clip_by_norm")
    result = getattr(gc, fn)(tree, MAX_NORM, nonfinite=nonfinite, fused=True)
    stats = gc.ClipStats(*(_host(a) for a in (result if inplace else result[1])))
    outs = [_host(o) for o in _leaves(tree if inplace else result[0])]
    assert not stats.finite.all()
    if nonfinite == "propagate":
        assert np.isinf(stats.norm).any()
    for i, (o, x) in enumerate(zip(outs, before, strict=True)):
        scale = float(stats.scale[i] if per_leaf else stats.scale)
        _assert_scaled(o, x, scale, zero=nonfinite == "zero", what=f"{fn} leaf {i}")
    if nonfinite == "skip":  # the same check, spelled out: x * 1 is x
        _assert_values(outs[0], before[0], "skip leaves a non-finite leaf unchanged")


# -------------------------------------------------------------------- the overflow contract


def _constants(parts: list[tuple[str, int, float]]) -> Build:
    """Leaves of ``n`` copies of one value (complex ones: value * (0.6 + 0.8j), |z| = value)."""

    def build() -> dict[str, Any]:
        tree = {}
        with np.errstate(all="ignore"):
            for i, (dtype, n, value) in enumerate(parts):
                v = value * (0.6 + 0.8j) if dtype in COMPLEX else value
                tree[_key(i)] = cp.asarray(np.full(n, v).astype(np_dtype(dtype)))
        return tree

    return build


EXTREMES = {
    "float16 300": [("float16", 1000, 300.0), ("float16", 65537, -300.0)],
    "float16 1e-6 (subnormal)": [("float16", 65537, 1e-6)],
    "bfloat16 1e33": [("bfloat16", 1000, 1e33), ("bfloat16", 65537, -1e33)],
    "float32 1e30": [("float32", 1000, 1e30), ("float32", 65537, -1e30)],
    "float32 1e-30": [("float32", 1000, 1e-30), ("float32", 65537, 1e-30)],
    "float32 3e-39 (subnormal)": [("float32", 65537, 3e-39)],
    "float64 1e200": [("float64", 1000, 1e200), ("float64", 65537, -1e200)],
    "float64 1e-200": [("float64", 1000, 1e-200), ("float64", 65537, 1e-200)],
    "complex64 1e30": [("complex64", 65537, 1e30)],
    "complex128 1e-200": [("complex128", 1000, 1e-200)],
    "1e-30 next to 3": [("float32", 10, 1e-30), ("float32", 2, 3.0)],
    "1e200 next to float16 300": [("float64", 7, 1e200), ("float16", 1000, 300.0)],
}


FLUSHED_BY_CUPY = {"float32 3e-39 (subnormal)"}


@pytest.mark.parametrize("fn", ["norms", *NORM_CLIPS])
@pytest.mark.parametrize("ord", [2.0, 1.0, 3.5, math.inf])
@pytest.mark.parametrize("case", list(EXTREMES))
def test_overflow_and_underflow(case, ord, fn):
    """The right norm and the right clip where a sum of squares overflows or underflows.

    ``eps=0`` and ``max_norm`` a quarter of the norm: scale 1/4, exactly
    representable, so the clipped leaves are exact too.
    """
    build = _constants(EXTREMES[case])
    # CuPy compiles its own kernels with -ftz=true: the generic path flushes
    # float32 subnormals to 0 there (the kernels do not; see _kernels.cu).
    generic = case not in FLUSHED_BY_CUPY
    if fn == "norms":
        check_norms(build, ord, generic=generic)
        return
    norm = _ref_global_norm([_wide(_host(x)) for x in _leaves(build())], ord)
    check_clip(build, fn, norm / 4, ord=ord, eps=0.0, generic=generic)


@pytest.mark.parametrize(
    ("dtypes", "res"),
    [
        (("float16",), np.float32),
        (("bfloat16",), np.float32),
        (("float32",), np.float32),
        (("complex64",), np.float32),
        (("float16", "bfloat16", "complex64"), np.float32),
        (("float64",), np.float64),
        (("complex128",), np.float64),
        (("float16", "float64"), np.float64),
        (("bfloat16", "complex128"), np.float64),
    ],
)
def test_result_dtype_and_device(dtypes, res):
    tree = _tree([(d, 10) for d in dtypes])()
    device = _device_id(_leaves(tree)[0])
    _check_array(gc.global_norm(tree, fused=True), res, (), device, "global_norm")
    _check_array(gc.leaf_norms(tree, fused=True), res, (len(dtypes),), device, "leaf_norms")
    for fn in NORM_CLIPS:
        result = getattr(gc, fn)(tree, 1.0, fused=True)
        stats = result if fn.endswith("_") else result[1]
        _check_stats(stats, _leaves(tree), (len(dtypes),) if fn.startswith("clip_by_norm") else ())


# --------------------------------------------------------------------------- FlatTree


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("fn", FNS)
def test_flat_tree(fn, mix):
    """Every function on a FlatTree (its buffers), against the generic path and float64."""
    build = _many(7, mix, real=fn in VALUE_CLIPS)
    check(fn, lambda: gc.FlatTree.from_tree(build()))


def test_flat_tree_gives_the_tree_results():
    build = _many(300, "float64")
    tree, flat = build(), gc.FlatTree.from_tree(build())
    for p in ORDS:
        exact = p in EXACT_ORDS and _is_real(_leaves(tree))
        for fn in ("global_norm", "leaf_norms"):
            got = getattr(gc, fn)(flat, ord=p, fused=True)
            want = _host(getattr(gc, fn)(tree, ord=p, fused=True))
            _assert_norms(got, want, exact=exact, what=f"{fn}(ord={p}) FlatTree vs tree")
    out, _ = gc.clip_by_global_norm(flat, 1.0, fused=True)
    assert isinstance(out, gc.FlatTree)
    buffers = flat.buffers
    gc.clip_by_global_norm_(flat, 1.0, fused=True)
    assert all(b is flat.buffers[k] for k, b in buffers.items())
    for got, want in zip(_leaves(flat), _leaves(out), strict=True):
        _assert_values(_host(got), _host(want), "in place vs functional on a FlatTree")


# ------------------------------------------------------------------ 2**28 and determinism


def _device_values(n: int, dtype: str, seed: int) -> Any:
    """``n`` values in [-1, 1) made on the device from a hash of the index (no host copy)."""

    def uniform(salt: int) -> Any:
        h = cp.arange(n, dtype=cp.uint32)
        h ^= np.uint32((seed * 0x9E3779B9 + salt * 0x7F4A7C15) & 0xFFFFFFFF)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)  # typed scalars: uint32 throughout, whatever the promotion rules
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
        return (h >> np.uint32(8)).astype(cp.float32) * np.float32(2.0**-23) - np.float32(1.0)

    x = uniform(1)
    if dtype in COMPLEX:
        x = x + 1j * uniform(2)
    return x.astype(np_dtype(dtype))


def _device_tree(specs: list[tuple[str, int]], seed: int = 0) -> dict[str, Any]:
    return {_key(i): _device_values(n, d, seed + i) for i, (d, n) in enumerate(specs)}


def _device_ref(leaves: list[Any], p: float) -> tuple[float, list[float]]:
    """Global and per-leaf float64 norms, reduced on the device in chunks, summed exactly here."""
    chunk = 1 << 24
    per_leaf, sums = [], []
    for x in leaves:
        flat = x.reshape(-1)
        wide = cp.complex128 if _name(x.dtype) in COMPLEX else cp.float64
        parts = []
        for a in range(0, flat.size, chunk):
            m = cp.abs(flat[a : a + chunk].astype(wide))
            if p == math.inf:
                parts.append(float(m.max()))
            else:
                parts.append(float(cp.sum(m**p)))
        if p == math.inf:
            per_leaf.append(max(parts, default=0.0))
        else:
            sums.append(math.fsum(parts))
            per_leaf.append(sums[-1] ** (1 / p))
    total = max(per_leaf) if p == math.inf else math.fsum(sums) ** (1 / p)
    return total, per_leaf


def _assert_scaled_on_device(got: Any, x: Any, scale: float, what: str) -> None:
    """``got == x * c`` on the device, ``c`` being ``scale`` in x's factor dtype (either neighbour).

    float16/bfloat16: the float32 product rounded to x's dtype, as in :func:`_times`.
    """
    factor = _factor_name(x.dtype)
    for c in _neighbours(scale, factor):
        c = cp.asarray(c, dtype=np_dtype(factor))
        want = (x.astype(c.dtype) * c).astype(x.dtype) if _name(x.dtype) in NARROW else x * c
        if bool(cp.array_equal(got, want)):
            return
    pytest.fail(f"{what}: not x * stats.scale in {x.dtype}")


BIG = {
    "float32": [("float32", 2**28)],
    "mixed": [("bfloat16", 2**27 + 1), ("float64", 2**26 + 3), ("complex64", 2**25 + 7)],
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(BIG))
def test_2_28_elements(layout):
    tree = _device_tree(BIG[layout])
    leaves = _leaves(tree)
    real = _is_real(leaves)
    originals = [x.copy() for x in leaves]
    for p in (2.0, 1.0, math.inf):
        total, per_leaf = _device_ref(leaves, p)
        exact = p == math.inf and real
        what = f"ord={p}"
        _assert_norms(gc.global_norm(tree, ord=p, fused=True), total, exact=exact, what=what)
        _assert_norms(gc.leaf_norms(tree, ord=p, fused=True), per_leaf, exact=exact, what=what)
        generic = _host(gc.global_norm(tree, ord=p, fused=False))
        _assert_norms(gc.global_norm(tree, ord=p, fused=True), generic, exact=exact, what=what)
    total, _ = _device_ref(leaves, 2.0)
    max_norm = total / 3
    out, stats = gc.clip_by_global_norm(tree, max_norm, fused=True)
    _check_stats(stats, leaves, ())
    _, generic = gc.clip_by_global_norm(tree, max_norm, fused=False)
    scale = float(stats.scale)
    assert scale == pytest.approx(max_norm / (total + 1e-6), rel=RTOL)
    assert scale == pytest.approx(float(generic.scale), rel=RTOL)
    for i, (o, x, x0) in enumerate(zip(_leaves(out), leaves, originals, strict=True)):
        _assert_scaled_on_device(o, x0, scale, f"clip_by_global_norm leaf {i}")
        assert bool(cp.array_equal(x, x0)), f"clip_by_global_norm modified leaf {i}"
    del out
    stats = gc.clip_by_global_norm_(tree, max_norm, fused=True)
    for i, (x, x0) in enumerate(zip(leaves, originals, strict=True)):
        _assert_scaled_on_device(x, x0, float(stats.scale), f"clip_by_global_norm_ leaf {i}")


def _repeat_layout(name: str) -> list[tuple[str, int]]:
    if name == "5 leaves":  # 2**24 entries
        return [
            ("float32", 2**23 + 1),
            ("bfloat16", 2**22 + 3),
            ("float16", 2**21 + 5),
            ("float64", 2**21 - 9),
            ("complex64", 1000),
        ]
    rng = np.random.default_rng(8)  # 5000 leaves, about 2**24 entries
    dtypes = ("float32", "bfloat16", "float16")
    return [(dtypes[i % 3], int(n)) for i, n in enumerate(rng.integers(1, 6711, 5000))]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["5 leaves", "5000 leaves"])
def test_bit_identical_over_100_runs(layout):
    tree = _device_tree(_repeat_layout(layout))

    def run() -> Any:
        norm = gc.global_norm(tree, fused=True)
        norms = gc.leaf_norms(tree, fused=True)
        out, stats = gc.clip_by_global_norm(tree, 1.0, fused=True)
        arrays = [norm, norms, *stats, *_leaves(out)]
        return cp.concatenate([a.reshape(-1).view(cp.uint8) for a in arrays])

    first = run()
    same = [cp.array_equal(run(), first) for _ in range(99)]
    differ = [i + 1 for i, s in enumerate(same) if not bool(s)]
    assert not differ, f"runs {differ[:10]} differ from the first run"


# --------------------------------------------------------------- streams and host syncs
#
# A one-thread kernel that spins until a flag in device memory is set holds a
# stream for as long as a test needs. Work queued behind it cannot run, so a
# call that returns while the spin is still running did not wait for the
# device (no host sync), and a call whose kernels went to another stream reads
# its input before the input is written. The flag is set by a memset on a
# second, non-blocking stream; a timeout ends the spin if all else fails.

_GATE = r"""
extern "C" __global__ void gradclip_test_gate(const volatile int* release,
                                              unsigned long long timeout_ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (release[0] == 0 && now - start < timeout_ns);
}
"""
GATE_TIMEOUT_S = 20.0


@functools.cache
def _gate_kernel() -> Any:
    return cp.RawKernel(_GATE, "gradclip_test_gate")


@contextlib.contextmanager
def _held(stream: Any, *, release_after: float | None = None, timeout_s: float = GATE_TIMEOUT_S):
    """Hold ``stream`` behind the spinning kernel while the block runs.

    Yields an Event recorded on ``stream`` just after the spin: ``event.done``
    stays False until the spin ends, so it turns True inside the block only if
    something waited for the device. The spin ends when the block exits, or
    after ``release_after`` seconds (from a timer thread) for calls that are
    allowed to wait. Every kernel the block launches must have been launched
    once before: loading code can wait for the device and would look like a sync.
    """
    flag = cp.zeros(1, cp.int32)
    device = _device_id(flag)
    releaser = cp.cuda.Stream(non_blocking=True)

    def release(value: int = 1) -> None:
        with cp.cuda.Device(device):
            cp.cuda.runtime.memsetAsync(flag.data.ptr, value, flag.nbytes, releaser.ptr)

    # Everything queued so far finishes before the memset, which runs on
    # another stream: ``flag`` may reuse a block that the current stream freed
    # while kernels queued there still read it. (A FlatTree build copies from
    # source leaves that are freed at once; on an H100 this memset zeroed the
    # low half of a float64 before its copy ran, and the built tree differed.)
    cp.cuda.Device(device).synchronize()
    release(0)  # the memset's first use, before anything spins
    releaser.synchronize()
    with stream:
        _gate_kernel()((1,), (1,), (flag, np.uint64(int(timeout_s * 1e9))))
    passed = cp.cuda.Event(disable_timing=True)
    passed.record(stream)
    timer = None if release_after is None else threading.Timer(release_after, release)
    if timer is not None:
        timer.start()
    try:
        yield passed
    finally:
        if timer is not None:
            timer.cancel()
            timer.join()
        release()
        releaser.synchronize()
        stream.synchronize()


def _reserve_pool(nbytes: int = 512 << 20) -> None:
    """Leave a free block in CuPy's pool for the current stream: no cudaMalloc while held."""
    cp.empty(nbytes, cp.uint8)  # freed at once; the pool keeps it and splits it


SYNC_SPECS = [
    ("float32", (300, 70)),
    ("bfloat16", 65537),
    ("float16", 1000),
    ("float64", 7),
    ("float32", ()),
    ("float32", 2**20 + 3),
]
SYNC_TREE = _tree(SYNC_SPECS, seed=11)


def _call(fn: str, tree: Any, nonfinite: str = "propagate", max_norm: Any = 1.0) -> Any:
    """``gc.<fn>`` with fused=True and this module's usual bounds."""
    f = getattr(gc, fn)
    if fn in ("global_norm", "leaf_norms"):
        return f(tree, nonfinite=nonfinite, fused=True)
    if fn in VALUE_CLIPS:
        return f(tree, CLIP_VALUE, nonfinite=nonfinite, fused=True)
    if fn == "clip_by_block_rms":
        return f(tree, MAX_NORM, nonfinite=nonfinite, fused=True)
    return f(tree, max_norm, nonfinite=nonfinite, fused=True)


def _result_arrays(result: Any) -> list[Any]:
    if result is None:
        return []
    if isinstance(result, gc.ClipStats):
        return list(result)
    if isinstance(result, gc.FlatTree):
        return _leaves(result)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], gc.ClipStats):
        return [*_result_arrays(result[0]), *result[1]]
    return optree.tree_leaves(result)


def _outcome(result: Any, tree: Any = None) -> list[bytes]:
    """Every array a call returned, then every leaf of ``tree``, as host bytes."""
    return [h.tobytes() for h in _outcome_arrays(result, tree)]


def _outcome_arrays(result: Any, tree: Any = None) -> list[np.ndarray]:
    """``_outcome``'s arrays, on the host, with their dtypes and shapes."""
    arrays = _result_arrays(result) + ([] if tree is None else _leaves(tree))
    return [_host(a) for a in arrays]


def _differences(got: list[np.ndarray], want: list[np.ndarray], limit: int = 4) -> list[str]:
    """Where two outcomes differ: array index, entry count, the first entries (flat index)."""
    if len(got) != len(want):
        return [f"{len(got)} arrays against {len(want)}"]
    lines = []
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        if g.tobytes() == w.tobytes():
            continue
        if g.shape != w.shape or g.dtype != w.dtype:
            lines.append(f"array {k}: {g.dtype}{g.shape} against {w.dtype}{w.shape}")
            continue
        gf, wf = g.reshape(-1), w.reshape(-1)
        bits = _UINT.get(g.dtype.itemsize)
        differ = np.flatnonzero(gf.view(bits) != wf.view(bits)) if bits else np.arange(gf.size)
        first = ", ".join(f"[{i}] {gf[i]!r} vs {wf[i]!r}" for i in differ[:limit])
        span = f"[{differ[0]}] to [{differ[-1]}]" if differ.size else "-"
        lines.append(
            f"array {k} ({g.dtype}, {g.size} entries): {differ.size} differ, {span}: {first}"
        )
    return lines


def test_the_gate_lets_queued_work_wait_and_sees_a_host_sync():
    """The harness itself: async work leaves the stream held, a device-to-host copy waits."""
    x = cp.ones(1000, cp.float32)
    float(cp.sum(x * 2))  # the kernels' first use, outside the gate
    stream = cp.cuda.get_current_stream()
    with _held(stream, timeout_s=2.0) as passed:
        y = x * 2
        held = not passed.done
        total = float(cp.sum(y))  # waits until the spin times out
        waited = passed.done
    assert held and waited and total == 2000.0


SYNC_FREE = [(fn, nf) for fn in ("global_norm", "leaf_norms") for nf in ("propagate", "zero")]
SYNC_FREE += [(fn, nf) for fn in CLIPS for nf in ("propagate", "zero", "skip")]


@pytest.mark.parametrize("flat", [False, True], ids=["tree", "FlatTree"])
@pytest.mark.parametrize(("fn", "nonfinite"), SYNC_FREE)
def test_no_host_sync(fn, nonfinite, flat):
    """The default path, ``"zero"`` and ``"skip"`` never wait for the device.

    Two calls under the held stream: on buffers the kernels have not seen (a
    new table) and on the same buffers again; the results match unheld calls.
    """

    def build() -> Any:
        return gc.FlatTree.from_tree(SYNC_TREE()) if flat else SYNC_TREE()

    _call(fn, build(), nonfinite)  # compiles and loads the kernels
    tree, ref = build(), build()
    _reserve_pool()
    with _held(cp.cuda.get_current_stream()) as passed:
        first = _call(fn, tree, nonfinite)
        second = _call(fn, tree, nonfinite)
        waited = passed.done
    assert not waited, f"gc.{fn}(nonfinite={nonfinite!r}) waited for the device (a host sync)"
    want = [
        _outcome_arrays(_call(fn, ref, nonfinite)),
        _outcome_arrays(_call(fn, ref, nonfinite), ref),
    ]
    got = [_outcome_arrays(first), _outcome_arrays(second, tree)]
    lines = [f"call {c + 1}: {line}" for c in range(2) for line in _differences(got[c], want[c])]
    if lines:
        # A control for the report: the same two calls, unheld, on a third build.
        again = build()
        control = [
            _outcome_arrays(_call(fn, again, nonfinite)),
            _outcome_arrays(_call(fn, again, nonfinite), again),
        ]
        unheld = [line for c in range(2) for line in _differences(control[c], want[c])]
        lines.append(f"unheld calls on a third build differ from the reference in {len(unheld)}")
        lines += [f"  {line}" for line in unheld]
    assert not lines, "held calls differ from unheld ones:\n" + "\n".join(lines)


@pytest.mark.parametrize("fn", ["clip_by_global_norm", "clip_by_global_norm_"])
def test_no_host_sync_with_max_norm_on_the_device(fn):
    max_norm = cp.asarray(1.0, cp.float32)
    _call(fn, SYNC_TREE(), max_norm=max_norm)
    tree, ref = SYNC_TREE(), SYNC_TREE()
    _reserve_pool()
    with _held(cp.cuda.get_current_stream()) as passed:
        result = _call(fn, tree, max_norm=max_norm)
        waited = passed.done
    assert not waited, f"gc.{fn} with a device max_norm waited for the device"
    assert _outcome(result, tree) == _outcome(_call(fn, ref, max_norm=max_norm), ref)


STREAM_FNS = [
    "global_norm",
    "leaf_norms",
    "clip_by_global_norm",
    "clip_by_global_norm_",
    "clip_by_norm_",
    "clip_by_value_",
    "clip_by_block_rms",
]


def _copy_into(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        cp.copyto(dst[k], v)


@pytest.mark.parametrize("fn", STREAM_FNS)
def test_non_default_stream(fn):
    """Inside ``with stream:`` the kernels run on that stream, in order, without a sync.

    The input is written on the stream behind the held spin, then the call is
    made: kernels sent to any other stream would read the zeros that were
    there before, and a sync would wait for the spin.
    """
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        src, dst = SYNC_TREE(), SYNC_TREE()
        _call(fn, SYNC_TREE())  # the kernels' first use on this stream
        _copy_into(dst, src)  # and the copy kernels'
        for v in dst.values():
            v.fill(0)
        _reserve_pool()
    stream.synchronize()
    with stream, _held(stream) as passed:
        _copy_into(dst, src)
        result = _call(fn, dst)
        waited = passed.done
    assert not waited, f"gc.{fn} on a non-default stream waited for the device"
    ref = SYNC_TREE()
    assert _outcome(result, dst) == _outcome(_call(fn, ref), ref)


def test_threads_on_their_per_thread_default_streams():
    """Threads on ``Stream.ptds`` clip one tree at once and each gets the right norms.

    The per-thread default stream has one handle (2) in every thread but is a
    different stream in each, so their kernels run concurrently: a workspace
    (and its last-block ticket) shared between them would mix their partial
    sums. Each thread must get its own layout, and every result must be the
    one a lone call gives.
    """
    from gradclip.cupy import _launch

    tree = SYNC_TREE()
    leaves = _leaves(tree)
    want = _host(gc.leaf_norms(tree, fused=True))
    dev = _launch.CupyDevice(leaves[0].device.id)
    nthreads, runs = 8, 40
    start = threading.Barrier(nthreads)
    got: list[Any] = [None] * nthreads
    layouts: list[Any] = [None] * nthreads

    def work(i: int) -> None:
        with cp.cuda.Stream.ptds:
            layouts[i] = _launch.layout(dev, leaves)
            start.wait()
            norms = [gc.leaf_norms(tree, fused=True) for _ in range(runs)]
            got[i] = cp.asnumpy(cp.stack(norms))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(lay) for lay in layouts}) == nthreads, "threads on ptds share a workspace"
    for i, rows in enumerate(got):
        assert rows is not None, f"thread {i} raised"
        np.testing.assert_array_equal(rows, np.broadcast_to(want, rows.shape), f"thread {i}")
    # One stream shared by two threads runs their kernels in order: one layout serves both.
    shared = cp.cuda.Stream(non_blocking=True)
    mine: list[Any] = []

    def on_shared() -> None:
        with shared:
            mine.append(_launch.layout(dev, leaves))

    for _ in range(2):
        t = threading.Thread(target=on_shared)
        t.start()
        t.join()
    assert mine[0] is mine[1]


@pytest.mark.parametrize("fn", ["global_norm", "clip_by_global_norm_", "clip_by_value_"])
def test_raise_checks_on_the_current_stream(fn):
    """``nonfinite="raise"`` may sync, but must read what the current stream wrote."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        src = _tree(SYNC_SPECS, seed=11, bad=(1, math.nan))()
        dst = SYNC_TREE()
        _call(fn, SYNC_TREE(), "raise")  # finite: compiles and loads the kernels
        _copy_into(SYNC_TREE(), src)
    stream.synchronize()
    with stream, _held(stream, release_after=0.5):
        _copy_into(dst, src)  # the NaN arrives behind the spin
        with pytest.raises(gc.NonFiniteError, match=re.escape(_path(1))):
            _call(fn, dst, "raise")
    _assert_unchanged(_leaves(dst), [_host(x) for x in _leaves(src)], f"{fn} after raising")


# ----------------------------------------------------------------------- a second device


@pytest.fixture
def device1() -> int:
    count = cp.cuda.runtime.getDeviceCount()
    if count < 2:
        pytest.skip(f"needs a second CUDA device; this machine has {count}")
    return 1


@pytest.mark.parametrize("fn", FNS)
def test_second_device(device1, fn):
    """Leaves on device 1 (the current device): computed there, results there."""
    with cp.cuda.Device(device1):
        tree = check(fn, _many(7, "float64", real=fn in VALUE_CLIPS))
        assert all(_device_id(x) == device1 for x in _leaves(tree))


@pytest.mark.parametrize("fn", [*STREAM_FNS, "clip_by_norm", "clip_by_value"])
def test_leaves_on_two_devices_are_refused(device1, fn):
    with cp.cuda.Device(device1):
        b = cp.asarray(np.ones(5, np.float32))
    tree = {"a": cp.asarray(np.ones(5, np.float32)), "b": b}
    with pytest.raises(ValueError, match=r"\['b'\].*one device"):
        _call(fn, tree)
    assert all((_host(x) == 1).all() for x in tree.values())


@pytest.mark.parametrize("fused", [None, False])
def test_a_bound_on_another_device_is_moved_beside_the_leaves(device1, fused):
    # The kernels would have read max_norm from device 1's memory on device 0.
    with cp.cuda.Device(device1):
        bound = cp.asarray(1.0, dtype=cp.float32)
    leaves = [cp.asarray(np.full(4, 2.0, np.float32))]
    out, stats = gc.clip_by_global_norm(leaves, bound, fused=fused)
    assert {_device_id(x) for x in [*out, *stats]} == {0}
    np.testing.assert_allclose(_host(out[0]), np.full(4, 0.25), rtol=1e-5)


@pytest.mark.parametrize("fn", STREAM_FNS)
def test_leaves_on_a_device_that_is_not_the_current_one(device1, fn):
    """Current device 0, leaves on device 1: computed on device 1, results left there.

    Last in the file: a kernel launched on the wrong device can leave the CUDA
    context unusable for every test after it.
    """
    with cp.cuda.Device(device1):
        tree, ref = SYNC_TREE(), SYNC_TREE()
        want = _outcome(_call(fn, ref), ref)
    result = _call(fn, tree)
    arrays = _result_arrays(result) + _leaves(tree)
    assert [_device_id(a) for a in arrays] == [device1] * len(arrays)
    with cp.cuda.Device(device1):
        assert _outcome(result, tree) == want


@pytest.mark.parametrize("how", ["fused=False", "FlatTree"])
@pytest.mark.parametrize("fn", STREAM_FNS)
def test_generic_path_and_flat_tree_on_a_device_that_is_not_the_current_one(device1, fn, how):
    """As above, for the generic path and for a FlatTree built from device-1 leaves.

    CuPy creates arrays and runs kernels on the current device whatever the
    operands' device, so gradclip makes the leaves' device current.
    """

    def build() -> Any:
        return gc.FlatTree.from_tree(SYNC_TREE()) if how == "FlatTree" else SYNC_TREE()

    def call(tree: Any) -> Any:
        if how == "FlatTree":
            return _call(fn, tree)
        f = getattr(gc, fn)
        if fn in ("global_norm", "leaf_norms"):
            return f(tree, fused=False)
        if fn in VALUE_CLIPS:
            return f(tree, CLIP_VALUE, fused=False)
        return f(tree, MAX_NORM if fn == "clip_by_block_rms" else 1.0, fused=False)

    with cp.cuda.Device(device1):
        ref = build()
        want = _outcome(call(ref), ref)
        leaves = SYNC_TREE()
    # Device 0 current from here: the FlatTree is built with it current, too.
    tree = gc.FlatTree.from_tree(leaves) if how == "FlatTree" else leaves
    result = call(tree)
    arrays = _result_arrays(result) + _leaves(tree)
    assert [_device_id(a) for a in arrays] == [device1] * len(arrays)
    with cp.cuda.Device(device1):
        assert _outcome(result, tree) == want


def test_adaptive_clipping_and_monitor_on_a_device_that_is_not_the_current_one(device1):
    """ZClip, AGC and GradMonitor keep their state and results on the leaves' device."""
    from gradclip.adaptive import AGC, ZClip
    from gradclip.monitor import GradMonitor

    with cp.cuda.Device(device1):
        tree = SYNC_TREE()
        params = SYNC_TREE()
    zclip = ZClip(warmup_steps=2)
    state = zclip.init(tree)
    for _ in range(3):
        out, state, stats = zclip.update(tree, state)
    agc = AGC(layout="torch")
    agc_out, _, agc_stats = agc.update(tree, agc.init(tree), params=params)
    monitor = GradMonitor(log_every=2)
    for _ in range(3):
        monitor.update(tree, stats)
    monitor.flush()
    arrays = [*state, *_leaves(out), *stats, *_leaves(agc_out), *agc_stats]
    assert [_device_id(a) for a in arrays] == [device1] * len(arrays)
    assert len(monitor.history.step) == 3
